"""`python -m experiments report RESULTS_DIR`: rebuild summary.json, the figures and the report
of a run folder from its tables (requests.parquet, steps.parquet) and config.yaml alone."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pandas as pd
import yaml

from experiments.summary import build_summary

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("requests.parquet", "steps.parquet", "config.yaml")


def rebuild_summary(run_dir: Path) -> dict:
    """Recompute and write summary.json; the creation time is kept from manifest.json."""
    missing = [name for name in REQUIRED_FILES if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f"{run_dir} lacks {missing}; pass the folder of a finished `python -m experiments run`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    requests = pd.read_parquet(run_dir / "requests.parquet")
    steps = pd.read_parquet(run_dir / "steps.parquet")

    created = None
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        created = json.loads(manifest_path.read_text()).get("created")
    summary = build_summary(requests, steps, config, created=created)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments report",
        description="Rebuild summary.json, figures/ and report.md/report.html of a run folder from its tables and config.",
    )
    parser.add_argument("run_dir", type=Path, help="run folder written by `python -m experiments run`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    run_dir = args.run_dir
    if not run_dir.is_dir():
        parser.exit(2, f"error: run folder {run_dir} not found; pass a folder under results/\n")
    try:
        rebuild_summary(run_dir)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    logger.info("rebuilt %s", run_dir / "summary.json")

    from experiments.report import build_report

    print(f"report: {build_report(run_dir)}")
    sys.stdout.flush()
