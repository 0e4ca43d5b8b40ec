"""`python -m experiments compare DIR...`: several runs side by side.

Each DIR is a run folder (with summary.json) or a folder of runs, such as a multirun sweep.
Writes compare.csv and compare.md (one row per run and system) and throughput-latency curves
(throughput_latency.png and .pdf): for a request-rate sweep, each system's points run from
light to heavy load. The output folder defaults to results/compare-<time>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from experiments.plots import system_colors, system_order

logger = logging.getLogger(__name__)

LATENCY_COLUMNS = [f"{metric}_{stat}" for metric in ("ttft", "tpot", "itl", "e2e") for stat in ("mean", "p50", "p90", "p99")]
SCALAR_COLUMNS = ["request_throughput", "output_throughput", "goodput", "num_completed", "num_failed",
                  "num_preemptions", "kv_fragmentation", "kv_usage_peak", "batch_size_mean"]
# (column, axis label, x column) of each panel of the figure
PANELS = (
    ("output_throughput", "Output throughput (tok/s)", "offered_rate"),
    ("ttft_p50", "TTFT p50 (ms)", "request_throughput"),
    ("tpot_p50", "TPOT p50 (ms)", "request_throughput"),
    ("e2e_p90", "E2E latency p90 (s)", "request_throughput"),
)
MILLISECONDS = {"ttft_p50", "tpot_p50"}


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders named by `paths`: each path itself, or the runs directly inside it."""
    runs = []
    for path in paths:
        if (path / "summary.json").is_file():
            runs.append(path)
            continue
        inner = sorted((p for p in path.iterdir() if (p / "summary.json").is_file()), key=_natural_key) if path.is_dir() else []
        if not inner:
            raise ValueError(f"{path} is neither a run folder (with summary.json) nor a folder of runs; "
                             f"pass folders written by `python -m experiments run`")
        runs.extend(inner)
    return runs


def _natural_key(path: Path):
    """Sort the jobs of a sweep (`<num>-<workload>`) by job number, other folders by name."""
    number = path.name.split("-", 1)[0]
    return (0, int(number), path.name) if number.isdigit() else (1, 0, path.name)


def offered_rate(config: dict, workload: dict) -> float | None:
    """Requests per second the workload offers: the configured rate, else requests / arrival span."""
    rate = (config.get("workload") or {}).get("rate")
    if isinstance(rate, (int, float)) and math.isfinite(rate):
        return float(rate)
    count, duration = workload.get("num_requests"), workload.get("duration_s")
    if count and duration:
        return (count - 1) / duration
    return None


def run_rows(run_dir: Path) -> list[dict]:
    """Read a run folder into one row per system."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config_path, workload_path = run_dir / "config.yaml", run_dir / "workload.json"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    workload = json.loads(workload_path.read_text()) if workload_path.is_file() else {}
    run = summary.get("run", {})
    rate = offered_rate(config or {}, workload)

    rows = []
    for system, values in summary.get("systems", {}).items():
        row = {
            "run": str(run_dir),
            "workload": run.get("workload"),
            "model": run.get("model"),
            "offered_rate": rate,
            "system": system,
            "kind": values.get("kind"),
            "estimate": values.get("estimate"),
        }
        for column in SCALAR_COLUMNS:
            row[column] = values.get(column)
        for column in LATENCY_COLUMNS:
            metric, stat = column.rsplit("_", 1)
            row[column] = (values.get(metric) or {}).get(stat)
        for metric, error in (values.get("errors") or {}).items():
            row[f"error_{metric}"] = error
        rows.append(row)
    return rows


def compare_frame(runs: list[Path]) -> pd.DataFrame:
    frame = pd.DataFrame([row for run in runs for row in run_rows(run)])
    return frame.sort_values(["system", "offered_rate"], kind="stable", na_position="last").reset_index(drop=True)


def to_markdown(frame: pd.DataFrame) -> str:
    """Format the headline columns as a Markdown table."""
    columns = ["run", "system", "offered_rate", "request_throughput", "output_throughput", "ttft_p50", "ttft_p90",
               "tpot_p50", "e2e_p50", "e2e_p90", "kv_fragmentation", "num_preemptions"]
    columns = [c for c in columns if c in frame]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in frame[columns].iterrows():
        cells = []
        for column in columns:
            value = row[column]
            if column == "run":
                value = run_label(Path(value))
            cells.append(_format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_label(run_dir: Path) -> str:
    """Name a run by its folder, prefixed with the sweep folder for a job of a multirun."""
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.parent.name.endswith("-sweep") else run_dir.name


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_curves(frame: pd.DataFrame, out_dir: Path) -> Path:
    """Throughput against offered load and latency against achieved throughput, one line per system."""
    fig = Figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    names = system_order(frame["system"].unique())
    colors = system_colors(names)

    for ax, (column, label, x_column) in zip(axes, PANELS):
        scale = 1000.0 if column in MILLISECONDS else 1.0
        for name in names:
            rows = frame[frame["system"] == name].sort_values("offered_rate", kind="stable")
            x = rows[x_column].to_numpy(dtype=float)
            y = rows[column].to_numpy(dtype=float) * scale
            keep = ~(np.isnan(x) | np.isnan(y))
            if not keep.any():
                continue
            predicted = (rows["kind"] == "predicted").any()
            ax.plot(x[keep], y[keep], marker="o", color=colors[name], linestyle="--" if predicted else "-", label=name)
        ax.set_xlabel("Offered rate (req/s)" if x_column == "offered_rate" else "Request throughput (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    legend = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))

    png = out_dir / "throughput_latency.png"
    fig.savefig(png, dpi=150)
    fig.savefig(out_dir / "throughput_latency.pdf")
    return png


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments compare",
        description="Put several runs side by side: a table (CSV and Markdown) and throughput-latency curves.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders of runs such as a multirun sweep")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: results/compare-<date>_<time>/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    try:
        runs = find_runs(args.runs)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    out_dir = args.out or Path("results") / f"compare-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    out_dir.mkdir(parents=True, exist_ok=True)

    frame = compare_frame(runs)
    frame.to_csv(out_dir / "compare.csv", index=False)
    (out_dir / "compare.md").write_text(to_markdown(frame))
    figure = plot_curves(frame, out_dir)
    logger.info("compared %d runs, %d systems", len(runs), frame["system"].nunique())
    print(f"table: {out_dir / 'compare.csv'}\nfigure: {figure}")
