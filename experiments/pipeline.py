"""`python -m experiments run`: replay one workload through every selected system and write the
tables, summary, manifest and report into the run folder that Hydra creates.

A run folder contains config.yaml, overrides.yaml, manifest.json, workload.json, requests.parquet,
steps.parquet, summary.json, figures/ and report.md/report.html, plus Hydra's .hydra/ and log.
The tables and the summary are written only once every system has finished. A run that fails
halfway is renamed to `<folder>.failed`, and one that fails its config checks is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import pandas as pd
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments import calibration, runners
from experiments.config import CONF_DIR, register_configs
from experiments.manifest import build_manifest
from experiments.metrics import requests_frame, steps_frame
from experiments.summary import build_summary
from experiments.systems import parse_system
from experiments.validation import ConfigError, check_command_line, check_run_config
from experiments.workloads import Workload, prompt_token_ids, to_json

logger = logging.getLogger(__name__)

EXIT_USAGE = 2  # status of a command rejected for a bad input, as argparse uses
COMMAND_ENV = "FLASHSERVE_EXPERIMENTS_COMMAND"  # the command line as typed; sweep workers inherit it


def write_inputs(cfg: DictConfig, folder: Path) -> tuple[Path, Path | None]:
    """Write the resolved model and hardware configs as files, the form the engine and simulator read.

    Overrides such as model.hf_config.num_hidden_layers=2 reach every system this way.
    """
    model_file = folder / "model.yaml"
    model_file.write_text(yaml.safe_dump(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=False))
    hardware_file = None
    if cfg.get("hardware") is not None:
        hardware_file = folder / "hardware.yaml"
        hardware_file.write_text(yaml.safe_dump(OmegaConf.to_container(cfg.hardware, resolve=True), sort_keys=False))
    return model_file, hardware_file


def run_systems(cfg: DictConfig, workload: Workload, model_file: Path, hardware_file: Path | None):
    """Run every system in config order; returns the request and step tables and manifest entries."""
    vocab_size = int(cfg.model.hf_config.vocab_size)
    prompt_ids = {spec.request_id: prompt_token_ids(spec, vocab_size, cfg.seed) for spec in workload.requests}
    systems = [parse_system(name) for name in cfg.systems]

    cost_model, cost_entry = None, None
    if any(system.kind == "predicted" for system in systems):
        logger.info("stage: cost model (%s)", cfg.sim.cost_model)
        cost_model, cost_entry = calibration.resolve_cost_model(cfg, model_file, hardware_file)

    request_frames, step_frames, timings = [], [], {}
    for system in systems:
        logger.info("stage: %s (%s)", system.name, _describe(system))
        start = time.perf_counter()
        with tqdm(total=len(workload.requests), desc=system.name, unit="req", disable=not cfg.progress,
                  file=sys.stderr, dynamic_ncols=True) as progress:
            request_records, step_records = _run_one(cfg, system, workload, prompt_ids, model_file, cost_model,
                                                     progress)
        timings[system.name] = time.perf_counter() - start
        logger.info("%s: %d requests, %d steps in %.1f s", system.name, len(request_records), len(step_records),
                    timings[system.name])
        request_frames.append(requests_frame(request_records, system.name))
        step_frames.append(steps_frame(step_records, system.name))

    requests = pd.concat(request_frames, ignore_index=True)
    steps = pd.concat(step_frames, ignore_index=True)
    return requests, steps, cost_entry, timings


def _describe(system) -> str:
    if system.runner == "engine":
        return f"engine, {system.batching} batching, {system.kv_allocation} KV"
    if system.runner == "sim":
        return f"simulator, {system.batching} batching, {system.kv_allocation} KV"
    if system.runner == "http":
        return "OpenAI-compatible server over HTTP"
    return "Hugging Face generate() in static batches"


def _run_one(cfg, system, workload, prompt_ids, model_file, cost_model, progress):
    requests = workload.requests
    if system.runner == "engine":
        return runners.run_measured(cfg, system, model_file, requests, prompt_ids, progress)
    if system.runner == "hf-generate":
        return runners.run_hf_baseline(cfg, model_file, requests, prompt_ids, progress)
    if system.runner == "sim":
        return runners.run_predicted(cfg, system, cost_model, requests, progress)
    return runners.run_http(cfg, requests, prompt_ids, progress)


def write_results(run_dir: Path, cfg: DictConfig, workload: Workload, requests: pd.DataFrame, steps: pd.DataFrame,
                  manifest: dict) -> dict:
    """Write the config, manifest, workload, tables and summary of a finished run; returns the summary."""
    config = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    overrides = manifest.get("overrides") or []
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides), sort_keys=False))
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (run_dir / "workload.json").write_text(json.dumps(to_json(workload), indent=2) + "\n")
    requests.to_parquet(run_dir / "requests.parquet", index=False)
    steps.to_parquet(run_dir / "steps.parquet", index=False)

    summary = build_summary(requests, steps, config, created=manifest["created"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def job_command(task_overrides: list[str], hydra_overrides: list[str]) -> str:
    """Return the command that reruns exactly this job (one job of a sweep runs without -m)."""
    kept = [o for o in hydra_overrides if not o.startswith(("hydra.mode=", "hydra/launcher=", "hydra.launcher."))]
    return shlex.join(["python", "-m", "experiments", "run", *task_overrides, *kept])


def run_experiment(cfg: DictConfig, run_dir: Path, overrides: list[str], command: str | None = None) -> Path:
    """Run the experiment of `cfg` into `run_dir`; returns the report path (or the summary path without a report)."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    workload = check_run_config(cfg)
    if cfg.engine.threads is not None:
        torch.set_num_threads(cfg.engine.threads)
    logger.info("stage: workload %s, %d requests over %.1f s (%s)", workload.name, len(workload.requests),
                workload.duration, "; ".join(workload.transformations))

    with tempfile.TemporaryDirectory(prefix="flashserve-run-") as scratch:
        model_file, hardware_file = write_inputs(cfg, Path(scratch))
        requests, steps, cost_entry, timings = run_systems(cfg, workload, model_file, hardware_file)

    manifest = build_manifest(
        created=created,
        seeds={"root": cfg.seed, "workload": cfg.seed, "prompt_token_ids": cfg.seed, "weights": cfg.seed},
        threads=cfg.engine.threads,
        workload_source=workload.source,
        cost_model=cost_entry,
        overrides=overrides,
        command=command,
    )
    manifest["invocation"] = os.environ.get(COMMAND_ENV)
    manifest["system_wall_s"] = timings
    logger.info("stage: tables and summary")
    write_results(run_dir, cfg, workload, requests, steps, manifest)

    if not cfg.report:
        return run_dir / "summary.json"
    logger.info("stage: figures and report")
    from experiments.report import build_report

    return build_report(run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="run", version_base="1.3")
def hydra_run(cfg: DictConfig) -> None:
    """Run one job of `run` or of a multirun sweep (the Hydra task function)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    command = job_command(overrides, list(hydra_cfg.overrides.hydra))
    start = time.perf_counter()
    try:
        report = run_experiment(cfg, run_dir, overrides, command)
    except ConfigError as error:
        # reached only when the checks before Hydra were skipped; leave no folder behind
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except BaseException:
        failed = run_dir.with_name(run_dir.name + ".failed")
        logger.exception("run failed; its folder is kept as %s", failed)
        run_dir.rename(failed)
        raise
    logger.info("done in %.1f s: %s", time.perf_counter() - start, report)
    print(f"{'report' if cfg.report else 'summary'}: {report}")


def main(argv: list[str]) -> None:
    """Check the command line's configs, then hand it to Hydra (`python -m experiments run ...`)."""
    register_configs()
    if not any(arg in ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
               or arg.startswith(("--cfg", "--info", "--config-path", "--config-name", "--config-dir", "-cp", "-cn",
                                  "-cd"))
               for arg in argv):
        overrides = [arg for arg in argv if not arg.startswith("-")]
        try:
            check_command_line(overrides)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    os.environ[COMMAND_ENV] = shlex.join(["python", "-m", "experiments", "run", *argv])
    sys.argv = [sys.argv[0], *argv]
    hydra_run()
