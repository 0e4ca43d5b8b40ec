"""manifest.json: what a run needs to be reproduced and its numbers judged.

It records the git commit and whether the tree had uncommitted changes, package versions, the
CPU and GPU, the trace file's SHA-256, the cost model file, seeds, threads and the command line.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from flashserve.model.runner import cpu_name

PACKAGES = (
    "flash-serve", "torch", "transformers", "tokenizers", "numpy", "pandas", "pyarrow", "simpy",
    "hydra-core", "omegaconf", "hydra-joblib-launcher", "matplotlib", "seaborn",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_state(root: Path = REPO_ROOT) -> dict:
    """Return the commit of the checkout and whether tracked or untracked files differ from it."""
    def git(*args) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
    }


def command_line() -> str:
    """Return the command as typed, in the `python -m experiments ...` form when run as a module."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "experiments":
        argv = ["python", "-m", "experiments", *argv[1:]]
    return shlex.join(argv)


def build_manifest(*, created: str | None = None, seeds: dict, threads: int | None, workload_source: dict,
                   cost_model: dict | None, overrides: list[str], command: str | None = None) -> dict:
    """Assemble the manifest of a run. `cost_model` contains the cost_model* entries of experiments.calibration."""
    return {
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or command_line(),
        "overrides": list(overrides),
        "git": git_state(),
        "packages": package_versions(),
        "hardware": hardware(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "seeds": seeds,
        "trace": {k: workload_source[k] for k in ("trace_path", "trace_sha256", "citation") if k in workload_source} or None,
        **(cost_model or {"cost_model": None}),
    }
