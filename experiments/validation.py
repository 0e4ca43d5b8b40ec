"""Checks of a composed run config, done before any folder is created.

`python -m experiments run` composes the config of every job of a sweep with Hydra's compose
API and checks it here first. A bad input therefore exits with status 2 and a message that names
the value and the fix, and it leaves no run folder behind.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from experiments import calibration
from experiments.config import CONF_DIR, available_options, register_configs
from experiments.systems import HTTP_SYSTEM, parse_system
from experiments.workloads import Workload, from_config
from flashserve.core.block_manager import BlockManager
from flashserve.model.runner import resolve_device, resolve_dtype
from sim.cost_model import FittedCostModel

logger = logging.getLogger(__name__)

RUN_COMMAND = "python -m experiments run +workload=poisson"


class ConfigError(ValueError):
    """An invalid run setting; the message names the value and the fix."""


def no_workload_message() -> str:
    return (
        "no workload chosen; the workload group has no default, so name one with +workload=NAME:\n"
        f"  {RUN_COMMAND}\n"
        f"workloads: {', '.join(available_options('workload'))}"
    )


def check_run_config(cfg: DictConfig) -> Workload:
    """Raise ConfigError for any invalid setting of a run; returns the workload it builds."""
    if cfg.get("workload") is None:
        raise ConfigError(no_workload_message())
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid config: {error}") from None

    systems = _check_systems(cfg)
    _check_engine(cfg)
    workload = _build_workload(cfg)
    _check_fits(cfg, workload)
    if any(parse_system(name).kind == "predicted" for name in systems):
        _check_sim(cfg)
    if HTTP_SYSTEM in systems:
        _check_http(cfg)
    if cfg.baseline.batch_size is not None and cfg.baseline.batch_size < 1:
        raise ConfigError(f"baseline.batch_size must be >= 1 or null (engine.max_num_seqs), got {cfg.baseline.batch_size}")
    return workload


def _check_systems(cfg: DictConfig) -> list[str]:
    systems = list(cfg.systems or [])
    if not systems:
        raise ConfigError("systems is empty; list at least one, for example systems=[measured/continuous]")
    for name in systems:
        try:
            parse_system(str(name))
        except ValueError as error:
            raise ConfigError(str(error)) from None
    duplicates = sorted({name for name in systems if systems.count(name) > 1})
    if duplicates:
        raise ConfigError(f"systems lists {duplicates} more than once; list each system once")
    return [str(name) for name in systems]


def _check_engine(cfg: DictConfig) -> None:
    from experiments.runners import engine_config

    engine = cfg.engine
    if engine.threads is not None and engine.threads < 1:
        raise ConfigError(f"engine.threads must be >= 1 or null (torch's default), got {engine.threads}")
    if engine.warmup_requests < 0:
        raise ConfigError(f"engine.warmup_requests must be >= 0, got {engine.warmup_requests}")
    try:
        engine_config(cfg, Path("model.yaml"), "continuous", "paged").validate()
        device = resolve_device(engine.device)
        resolve_dtype(engine.dtype, device)
    except ValueError as error:
        raise ConfigError(f"invalid engine setting: {error}") from None

    checkpoint = (cfg.model or {}).get("path")
    if checkpoint and not (Path(os.path.expandvars(str(checkpoint))).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"model.path={checkpoint} of model {cfg.model.get('name')} is not a checkpoint directory with a "
            f"config.json; point it at one, or set model.path=null to run the model's shape with random weights"
        )

    hf_config = (cfg.model or {}).get("hf_config") or {}
    model_max = hf_config.get("max_position_embeddings") or 2048
    if engine.max_model_len > model_max:
        raise ConfigError(
            f"engine.max_model_len={engine.max_model_len} exceeds the max_position_embeddings={model_max} of model "
            f"{cfg.model.get('name')}; set engine.max_model_len={model_max} or lower"
        )


def _build_workload(cfg: DictConfig) -> Workload:
    workload_cfg = cfg.workload
    name = workload_cfg.get("name", "?")
    try:
        if workload_cfg.get("kind") == "synthetic":
            rate = float(workload_cfg.rate)
            if math.isnan(rate) or rate <= 0:
                raise ValueError(f"workload.rate must be > 0 requests/s (inf sends every request at once), got {rate}; "
                                 f"set for example workload.rate=10")
        return from_config(workload_cfg, cfg.seed, cfg.engine.max_model_len)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"workload {name}: {error}") from None


def _check_fits(cfg: DictConfig, workload: Workload) -> None:
    """Every request must fit in the KV cache on its own, or the engine could never serve it."""
    engine = cfg.engine
    blocks = BlockManager(engine.num_kv_blocks, engine.block_size)
    too_long = [r for r in workload.requests if blocks.blocks_for(r.prompt_len + r.output_len) > engine.num_kv_blocks]
    if too_long:
        longest = max(r.prompt_len + r.output_len for r in too_long)
        raise ConfigError(
            f"{len(too_long)} requests of workload {workload.name} need more than the {engine.num_kv_blocks} KV "
            f"blocks of {engine.block_size} tokens (the longest has {longest} tokens); raise engine.num_kv_blocks "
            f"to at least {blocks.blocks_for(longest)} or lower engine.max_model_len"
        )


def _check_sim(cfg: DictConfig) -> None:
    kind = cfg.sim.cost_model
    if kind not in calibration.COST_MODELS:
        raise ConfigError(f"sim.cost_model must be one of {calibration.COST_MODELS}, got {kind!r}; "
                          f"choose it with sim=fitted or sim=roofline")
    if cfg.get("hardware") is None:
        raise ConfigError(f"the simulator needs a hardware spec; choose one with hardware=NAME "
                          f"(one of {available_options('hardware')})")
    if kind == "fitted":
        if cfg.sim.calibration_grid not in calibration.CALIBRATION_GRIDS:
            raise ConfigError(f"sim.calibration_grid must be one of {calibration.CALIBRATION_GRIDS}, "
                              f"got {cfg.sim.calibration_grid!r}")
        path = calibration.cost_file(cfg)
        if cfg.sim.cost_file is not None and not path.is_file():
            raise ConfigError(f"sim.cost_file={cfg.sim.cost_file} not found; create it with "
                              f"`python -m experiments calibrate output={cfg.sim.cost_file}` or set sim.cost_file=null "
                              f"to use the calibration cache")
        if path.is_file():
            try:
                FittedCostModel.load(path)
            except ValueError as error:
                raise ConfigError(f"{error}; delete it to calibrate again, or point sim.cost_file at another file") from None
        if not path.is_file() and not cfg.sim.calibrate_if_missing:
            raise ConfigError(f"no fitted cost model at {path} and sim.calibrate_if_missing is false; run "
                              f"`python -m experiments calibrate` first or set sim.calibrate_if_missing=true")


def _check_http(cfg: DictConfig) -> None:
    if not cfg.http.base_url:
        raise ConfigError(f"{HTTP_SYSTEM} needs http.base_url, for example http.base_url=http://127.0.0.1:8000/v1")
    if cfg.http.max_concurrency is not None and cfg.http.max_concurrency < 1:
        raise ConfigError(f"http.max_concurrency must be >= 1 or null, got {cfg.http.max_concurrency}")


# composing the jobs of a command line


def job_overrides(overrides: list[str]) -> list[list[str]]:
    """Expand a command line's sweeps into the override list of every job (one for a plain run).

    A sweep that cannot be enumerated here (a glob, or an interval for an optimizer) is left out
    and checked by each job itself.
    """
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        if override.is_sweep_override() and override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP:
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        elif not override.is_sweep_override():
            choices.append([override.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


def check_command_line(overrides: list[str], config_name: str = "run") -> None:
    """Compose every job of the command line and check it; raise ConfigError on the first bad one."""
    register_configs()
    try:
        jobs = job_overrides(overrides)
    except Exception as error:  # Hydra's parser raises its own OverrideParseException
        raise ConfigError(f"invalid override: {error}") from None

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
        for job in jobs:
            try:
                cfg = compose(config_name=config_name, overrides=job)
            except MissingConfigException as error:
                raise ConfigError(_missing_option_message(job, error)) from None
            except (ConfigCompositionException, OmegaConfBaseException) as error:
                raise ConfigError(f"invalid config: {error}") from None
            try:
                if config_name == "run":
                    check_run_config(cfg)
            except OmegaConfBaseException as error:
                raise ConfigError(f"invalid config: {error}") from None


def _missing_option_message(job: list[str], error: Exception) -> str:
    for line in job:
        key, _, value = line.lstrip("+~").partition("=")
        if key in ("workload", "model", "engine", "sim", "hardware") and value not in available_options(key):
            command = RUN_COMMAND if key == "workload" else f"python -m experiments run +workload=poisson {key}=NAME"
            return f"unknown {key} {value!r}; choose one of {available_options(key)}, for example:\n  {command}"
    return str(error)
