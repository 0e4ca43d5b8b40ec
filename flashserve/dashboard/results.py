"""Loading experiment runs for the results page.

A run folder is `<results>/<date>/<time>-<workload>/` and may contain summary.json,
requests.parquet and steps.parquet (one row per request or step, with a `system` column naming
the engine, the simulator or a baseline), PNG figures and report.md. Every file is optional: the
page shows what a run has and names what failed to load.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

RUN_MARKERS = ("summary.json", "requests.parquet", "steps.parquet", "report.md")
CONFIG_FILES = ("config.yaml", "resolved_config.yaml", ".hydra/config.yaml", "metadata.json")
MAX_RUN_DEPTH = 4  # <results>/<date>/<time>-<workload>/ is depth 2; deeper layouts (sweeps) are allowed


@dataclass
class Run:
    """The files of one run that could be read; `errors` maps each unreadable file to the reason."""

    path: Path
    label: str  # path relative to the results folder
    summary: dict | list | None = None
    requests: pd.DataFrame | None = None
    steps: pd.DataFrame | None = None
    figures: list[Path] = field(default_factory=list)
    report: str | None = None
    configs: dict[str, str] = field(default_factory=dict)  # relative path -> text
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def systems(self) -> list[str]:
        """Systems named in the request or step records, in order of first appearance."""
        names: list[str] = []
        for frame in (self.requests, self.steps):
            if frame is not None and "system" in frame.columns:
                names.extend(str(name) for name in frame["system"].dropna().unique() if str(name) not in names)
        return names


def find_runs(results_dir: str | os.PathLike) -> list[Path]:
    """Run folders under `results_dir`, newest first (folder names start with the date and time).

    A run folder contains at least one of summary.json, requests.parquet, steps.parquet or
    report.md. Hidden folders (such as Hydra's .hydra) are skipped.
    """
    root = Path(results_dir)
    if not root.is_dir():
        return []
    runs = []
    for directory, subdirectories, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")] if depth < MAX_RUN_DEPTH else []
        if any(marker in files for marker in RUN_MARKERS):
            runs.append(Path(directory))
    return sorted(runs, key=lambda path: path.relative_to(root).as_posix(), reverse=True)


def load_run(path: str | os.PathLike, results_dir: str | os.PathLike | None = None) -> Run:
    """Read every known file of the run in `path`; a missing file is skipped and an unreadable one recorded."""
    path = Path(path)
    label = path.relative_to(results_dir).as_posix() if results_dir is not None else path.name
    run = Run(path=path, label=label)

    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text())
        except (OSError, ValueError) as error:
            run.errors["summary.json"] = str(error)
    for name in ("requests", "steps"):
        parquet = path / f"{name}.parquet"
        if parquet.is_file():
            try:
                setattr(run, name, pd.read_parquet(parquet))
            except Exception as error:  # pyarrow raises several types for damaged or partial files
                run.errors[parquet.name] = f"{type(error).__name__}: {error}"
    report_path = path / "report.md"
    if report_path.is_file():
        try:
            run.report = report_path.read_text()
        except OSError as error:
            run.errors["report.md"] = str(error)
    for name in CONFIG_FILES:
        config_path = path / name
        if config_path.is_file():
            try:
                run.configs[name] = config_path.read_text()
            except OSError as error:
                run.errors[name] = str(error)
    run.figures = sorted(p for p in path.rglob("*.png") if not any(part.startswith(".") for part in p.parts))

    for name, reason in run.errors.items():
        logger.warning("run %s: cannot read %s: %s", path, name, reason)
    return run


# summary.json

def summary_tables(summary: dict | list | None) -> list[tuple[str, pd.DataFrame]]:
    """Turn a summary into titled tables, whatever its nesting.

    A list of records becomes one table. In a mapping, scalar values form one two-column table
    and each value that maps names to mappings of scalars (for example system -> metric ->
    value) becomes a table with one row per name. Deeper values are searched the same way, with
    the keys on the way joined into the title.
    """
    tables: list[tuple[str, pd.DataFrame]] = []
    _collect_tables(summary, "summary", tables)
    return tables


def _collect_tables(value, title: str, tables: list[tuple[str, pd.DataFrame]]) -> None:
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            tables.append((title, pd.json_normalize(value)))
        return
    if not isinstance(value, dict):
        return

    scalars = {key: item for key, item in value.items() if _is_scalar(item)}
    if scalars:
        tables.append((title, pd.DataFrame({"name": list(scalars), "value": [_cell(v) for v in scalars.values()]})))

    nested = {key: item for key, item in value.items() if isinstance(item, dict)}
    rows = {key: item for key, item in nested.items() if item and all(_is_scalar(v) for v in item.values())}
    if len(rows) >= 2:
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "name"
        tables.append((title, table.reset_index()))
        nested = {key: item for key, item in nested.items() if key not in rows}
    for key, item in nested.items():
        _collect_tables(item, f"{title} / {key}" if title != "summary" else str(key), tables)
    for key, item in value.items():
        if isinstance(item, list):
            _collect_tables(item, f"{title} / {key}" if title != "summary" else str(key), tables)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def _cell(value):
    return value if isinstance(value, numbers.Number) and not isinstance(value, bool) else str(value)


def compare_tables(first: pd.DataFrame, second: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame | None:
    """Numeric cells of two tables with the same first (key) column, side by side with their relative change.

    Returns None when the tables share no key or no numeric column.
    """
    key = first.columns[0]
    if second.columns[0] != key:
        return None
    numeric = [c for c in first.columns[1:] if c in second.columns
               and pd.api.types.is_numeric_dtype(first[c]) and pd.api.types.is_numeric_dtype(second[c])]
    if not numeric:
        return None
    left = first.set_index(key)[numeric].melt(ignore_index=False, var_name="metric", value_name=labels[0])
    right = second.set_index(key)[numeric].melt(ignore_index=False, var_name="metric", value_name=labels[1])
    merged = left.reset_index().merge(right.reset_index(), on=[key, "metric"], how="inner")
    if merged.empty:
        return None
    base = merged[labels[0]].astype(float)
    merged["change"] = (merged[labels[1]].astype(float) - base) / base.abs().where(base != 0)
    return merged


# predicted vs measured

def request_latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """TTFT and end-to-end latency of each finished request, in seconds, with its system.

    TTFT is first token time minus arrival time and E2E is finish time minus arrival time, as
    in vLLM's serving benchmark. Requests without a first token or a finish time are dropped.
    """
    needed = {"arrival_time", "first_token_time", "finish_time"}
    if not needed.issubset(requests.columns):
        return pd.DataFrame(columns=["system", "metric", "seconds"])
    frame = pd.DataFrame({
        "system": requests["system"].astype(str) if "system" in requests.columns else "run",
        "ttft": requests["first_token_time"] - requests["arrival_time"],
        "e2e": requests["finish_time"] - requests["arrival_time"],
    })
    return frame.melt(id_vars="system", var_name="metric", value_name="seconds").dropna()


def cdf(latencies: pd.DataFrame) -> pd.DataFrame:
    """Empirical CDF per system and metric: each latency with the fraction of requests at or below it."""
    parts = []
    for (system, metric), group in latencies.groupby(["system", "metric"], sort=False):
        seconds = group["seconds"].sort_values().to_numpy()
        parts.append(pd.DataFrame({
            "system": system,
            "metric": metric,
            "seconds": seconds,
            "fraction": (pd.RangeIndex(1, len(seconds) + 1) / len(seconds)).to_numpy(),
        }))
    if not parts:
        return pd.DataFrame(columns=["system", "metric", "seconds", "fraction"])
    return pd.concat(parts, ignore_index=True)


def step_timeline(steps: pd.DataFrame, max_points: int = 400) -> pd.DataFrame:
    """KV usage, fragmentation and cumulative output tokens over time, per system.

    Time is the end of each step since that system's first step. Fragmentation is
    1 - tokens stored / token slots allocated (0 when no slot is allocated). Each system keeps at
    most `max_points` evenly spaced steps, so the chart stays small.
    """
    needed = {"start_time", "duration", "kv_blocks_used", "kv_blocks_total", "kv_tokens_used", "kv_slots_allocated"}
    columns = ["system", "time_s", "kv_usage", "kv_fragmentation", "output_tokens"]
    if not needed.issubset(steps.columns):
        return pd.DataFrame(columns=columns)
    systems = steps["system"].astype(str) if "system" in steps.columns else pd.Series("run", index=steps.index)
    parts = []
    for system, group in steps.groupby(systems, sort=False):
        group = group.sort_values("start_time")
        end = group["start_time"] + group["duration"]
        allocated = group["kv_slots_allocated"].astype(float)
        sampled = group["num_sampled"] if "num_sampled" in group.columns else pd.Series(0, index=group.index)
        part = pd.DataFrame({
            "system": system,
            "time_s": end - float(group["start_time"].iloc[0]),
            "kv_usage": group["kv_blocks_used"] / group["kv_blocks_total"],
            "kv_fragmentation": (1.0 - group["kv_tokens_used"] / allocated).where(allocated > 0, 0.0),
            "output_tokens": sampled.cumsum(),
        })
        stride = max(1, len(part) // max_points)
        parts.append(part.iloc[::stride])
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)
