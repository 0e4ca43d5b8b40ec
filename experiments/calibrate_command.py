"""`python -m experiments calibrate`: profile the engine and fit the simulator's cost model.

Writes the fitted cost model to `output`, or by default to the calibration cache entry that
`python -m experiments run` reads for the same model, hardware, thread count and engine settings.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from experiments import calibration
from experiments.config import CONF_DIR, register_configs
from experiments.pipeline import write_inputs

logger = logging.getLogger(__name__)


@hydra.main(config_path=str(CONF_DIR), config_name="calibrate", version_base="1.3")
def hydra_calibrate(cfg: DictConfig) -> None:
    if cfg.sim.calibration_grid not in calibration.CALIBRATION_GRIDS:
        print(f"error: sim.calibration_grid must be one of {calibration.CALIBRATION_GRIDS}, "
              f"got {cfg.sim.calibration_grid!r}", file=sys.stderr)
        sys.exit(2)
    if cfg.engine.threads is not None:
        torch.set_num_threads(cfg.engine.threads)
    out_path = Path(cfg.output) if cfg.output else calibration.cost_file(cfg)
    logger.info("stage: profiling %s with %s threads into %s", cfg.model.name, torch.get_num_threads(), out_path)
    with tempfile.TemporaryDirectory(prefix="flashserve-calibrate-") as scratch:
        model_file, _ = write_inputs(cfg, Path(scratch))
        calibration.calibrate(cfg, model_file, out_path)
    print(f"cost model: {out_path}")


def main(argv: list[str]) -> None:
    register_configs()
    sys.argv = [sys.argv[0], *argv]
    hydra_calibrate()
