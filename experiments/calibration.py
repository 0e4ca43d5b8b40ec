"""The simulator's cost model for a run: a fitted cost file (cached per model, hardware and
threads, calibrated once when missing) or the roofline estimate."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.workloads import file_sha256

logger = logging.getLogger(__name__)

COST_MODELS = ("fitted", "roofline")
CALIBRATION_GRIDS = ("default", "small")


def cache_key(cfg: DictConfig) -> str:
    """`MODEL_HARDWARE_Nthreads_HASH`: the hash covers the model shape, dtype, device, block size
    and profiling grid, so that changing any of them never reuses a stale fit."""
    model = cfg.model.get("name", "model")
    hardware = (cfg.get("hardware") or {}).get("name", "hardware")
    threads = cfg.engine.threads if cfg.engine.threads is not None else "default"
    settings = {
        "hf_config": OmegaConf.to_container(cfg.model.get("hf_config") or {}, resolve=True),
        "load_format": cfg.model.get("load_format"),
        "dtype": cfg.engine.dtype,
        "device": cfg.engine.device,
        "block_size": cfg.engine.block_size,
        "calibration_grid": cfg.sim.calibration_grid,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    key = f"{model}_{hardware}_{threads}threads_{digest}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", key)


def cost_file(cfg: DictConfig) -> Path:
    """Return the fitted cost model file of a run: sim.cost_file, else the calibration cache entry."""
    if cfg.sim.cost_file:
        return Path(cfg.sim.cost_file)
    return Path(cfg.calibration_dir) / f"{cache_key(cfg)}.json"


def calibrate(cfg: DictConfig, model_file: Path, out_path: Path) -> Path:
    """Profile the engine under the run's settings, fit the cost model and write it to `out_path`."""
    from sim import profiling

    engine = cfg.engine
    grid = profiling.SMALL_GRID if cfg.sim.calibration_grid == "small" else profiling.ProfileGrid()
    start = time.perf_counter()
    cost_model = profiling.calibrate(
        model=str(model_file),
        grid=grid,
        num_threads=engine.threads,
        hardware=(cfg.get("hardware") or {}).get("name"),
        block_size=engine.block_size,
        # NOTE: the profiling engine gets a cache sized from memory, not the run's num_kv_blocks,
        # so that the grid's large decode batches are profiled too. A step's time depends on the
        # contexts it reads, not on the size of the cache they are in.
        num_kv_blocks=None,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        device=engine.device,
        dtype=engine.dtype,
        seed=cfg.seed,
        load_format=cfg.model.get("load_format", "auto"),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + f".{os.getpid()}.partial")
    cost_model.save(partial)
    os.replace(partial, out_path)  # atomic: a concurrent job never reads half a file
    logger.info("calibrated in %.1f s: %s; wrote %s", time.perf_counter() - start, cost_model.describe(), out_path)
    return out_path


def resolve_cost_model(cfg: DictConfig, model_file: Path, hardware_file: Path | None):
    """Load the run's cost model and return it with its manifest entries.

    A missing fitted model is calibrated and cached first.
    """
    from sim import load_cost_model

    if cfg.sim.cost_model == "roofline":
        model = load_cost_model("roofline", model=str(model_file), hardware=str(hardware_file))
        return model, {"cost_model": model.describe(), "cost_model_kind": "roofline"}

    path = cost_file(cfg)
    if not path.is_file():
        lock_path = path.with_name(path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            # jobs of a parallel sweep share the cache: the first calibrates, the others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                logger.info("no fitted cost model at %s; calibrating once for this model, hardware and thread count", path)
                calibrate(cfg, model_file, path)
    else:
        logger.info("fitted cost model: %s", path)
    model = load_cost_model("fitted", path=str(path))
    entry = {
        "cost_model": model.describe(),
        "cost_model_kind": "fitted",
        "cost_model_file": str(path.resolve()),
        "cost_model_sha256": file_sha256(path),
    }
    return model, entry
