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

from experiments import metrics

logger = logging.getLogger(__name__)

RUN_MARKERS = ("summary.json", "requests.parquet", "steps.parquet", "report.md")
CONFIG_FILES = ("config.yaml", "overrides.yaml", "manifest.json", "workload.json")  # shown as text when present
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
    run.figures = sorted(
        png for png in path.rglob("*.png") if not any(part.startswith(".") for part in png.relative_to(path).parts)
    )

    for name, reason in run.errors.items():
        logger.warning("run %s: cannot read %s: %s", path, name, reason)
    return run


# summary.json

def summary_tables(summary: dict | list | None) -> list[tuple[str, pd.DataFrame]]:
    """Turn a summary into titled tables, whatever its nesting.

    A list of records becomes one table. In a mapping, scalar values form a name/value table.
    A value that maps two or more names to mappings with mostly the same keys (for example
    system -> metrics) becomes a table with one row per flattened key ("ttft.p50") and one
    column per name; its text rows (such as a system's kind) go to a second table, so the first
    stays numeric. Other mappings are searched the same way, with their keys joined into the title.
    """
    tables: list[tuple[str, pd.DataFrame]] = []
    _collect_tables(summary, "", tables)
    return tables


def _collect_tables(value, title: str, tables: list[tuple[str, pd.DataFrame]]) -> None:
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            tables.append((title or "summary", pd.json_normalize(value)))
        return
    if not isinstance(value, dict):
        return

    scalars = {key: item for key, item in value.items() if _is_scalar(item)}
    if scalars:
        # Values are text, because one Arrow column cannot mix strings and numbers.
        tables.append((title or "summary", pd.DataFrame({"name": [str(k) for k in scalars],
                                                         "value": [str(v) for v in scalars.values()]})))
    for key, item in value.items():
        child = f"{title} / {key}" if title else str(key)
        if isinstance(item, dict) and _is_record_group(item):
            tables.extend(_record_group_tables(item, child))
        elif isinstance(item, (dict, list)):
            _collect_tables(item, child, tables)


def _is_record_group(value: dict) -> bool:
    """True for a mapping of two or more names to mappings that share at least half of their keys."""
    if len(value) < 2 or not all(isinstance(item, dict) and item for item in value.values()):
        return False
    key_sets = [set(_flatten(item)) for item in value.values()]
    shared = set.intersection(*key_sets)
    return len(shared) >= 0.5 * len(set.union(*key_sets))


def _record_group_tables(group: dict, title: str) -> list[tuple[str, pd.DataFrame]]:
    flat = {str(name): _flatten(record) for name, record in group.items()}
    keys = list(dict.fromkeys(key for record in flat.values() for key in record))
    numeric = [k for k in keys if all(_is_number(r.get(k)) or r.get(k) is None for r in flat.values())]
    text = [k for k in keys if k not in numeric]
    tables = []
    if numeric:
        table = pd.DataFrame({name: [record.get(k) for k in numeric] for name, record in flat.items()},
                             dtype=float)
        table.insert(0, "metric", numeric)
        tables.append((title, table))
    if text:
        table = pd.DataFrame({name: [None if record.get(k) is None else str(record.get(k)) for k in text]
                              for name, record in flat.items()})
        table.insert(0, "field", text)
        tables.append((f"{title} (labels)", table))
    return tables


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested mappings as one level, with keys joined by dots; lists are kept as text."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if _is_scalar(value) else json.dumps(value)
    return flat


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def compare_tables(first: pd.DataFrame, second: pd.DataFrame, labels: tuple[str, str]) -> pd.DataFrame | None:
    """Numeric cells of two tables keyed by the same first column, side by side with their relative change.

    The result has the key column, `column` (the name of the compared column), one column per
    label and `change` = (second - first) / |first|. Returns None when the tables share no key
    or no numeric column.
    """
    key = first.columns[0]
    if second.columns[0] != key:
        return None
    numeric = [c for c in first.columns[1:] if c in second.columns
               and pd.api.types.is_numeric_dtype(first[c]) and pd.api.types.is_numeric_dtype(second[c])]
    if not numeric:
        return None
    left = first.melt(id_vars=key, value_vars=numeric, var_name="column", value_name=labels[0])
    right = second.melt(id_vars=key, value_vars=numeric, var_name="column", value_name=labels[1])
    merged = left.merge(right, on=[key, "column"], how="inner")
    if merged.empty:
        return None
    base = merged[labels[0]].astype(float)
    merged["change"] = (merged[labels[1]].astype(float) - base) / base.abs().where(base != 0)
    return merged


# predicted vs measured

KV_ERROR_METRICS = ("kv_fragmentation", "kv_usage_mean")


def request_latencies(requests: pd.DataFrame) -> pd.DataFrame:
    """TTFT and end-to-end latency in seconds of each completed request, one row per request and metric.

    The definitions are those of `experiments.metrics.add_latencies`. Tables without the time
    columns of a request record give an empty frame.
    """
    columns = ["system", "metric", "seconds"]
    needed = {"arrival_time", "first_token_time", "finish_time", "num_output_tokens", "finish_reason"}
    if not needed.issubset(requests.columns):
        return pd.DataFrame(columns=columns)
    frame = metrics.add_latencies(metrics.completed(requests))
    frame["system"] = frame["system"].astype(str) if "system" in frame.columns else "run"
    return frame[["system", "ttft", "e2e"]].melt(id_vars="system", var_name="metric", value_name="seconds").dropna()


def system_summaries(run: Run) -> dict[str, dict]:
    """Summary of each system: summary.json's "systems" mapping when it has one, else computed
    from the run's record tables with `experiments.metrics.summarize`."""
    stored = run.summary.get("systems") if isinstance(run.summary, dict) else None
    if isinstance(stored, dict) and stored:
        return {str(name): value for name, value in stored.items() if isinstance(value, dict)}

    summaries = {}
    for system in run.systems:
        requests = _rows_of(run.requests, system)
        steps = _rows_of(run.steps, system)
        summary = {}
        if requests is not None and not requests.empty and {"arrival_time", "finish_reason"} <= set(requests.columns):
            summary.update(metrics.summarize_requests(metrics.add_latencies(requests)))
        if steps is not None and not steps.empty and "kv_slots_allocated" in steps.columns:
            summary.update(metrics.summarize_steps(steps))
        summaries[system] = summary
    return summaries


def _rows_of(frame: pd.DataFrame | None, system: str) -> pd.DataFrame | None:
    if frame is None or "system" not in frame.columns:
        return None
    return frame[frame["system"].astype(str) == system]


def prediction_pairs(summaries: dict[str, dict]) -> list[tuple[str, str]]:
    """(predicted, measured) system pairs.

    A system is predicted when its summary's `kind` is "predicted" or, without a kind, when its
    name starts with "predicted/". Its measured twin is the summary's `twin`, else the system
    named "measured/" plus the same suffix.
    """
    pairs = []
    for name, summary in summaries.items():
        kind = summary.get("kind") or name.split("/", 1)[0]
        if kind != "predicted":
            continue
        twin = summary.get("twin") or ("measured/" + name.split("/", 1)[1] if "/" in name else None)
        if twin in summaries:
            pairs.append((name, twin))
    return pairs


def relative_errors(summaries: dict[str, dict], pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Relative error (other - reference) / reference of the headline metrics, one row per (other, reference) pair.

    Latency and throughput errors come from `experiments.metrics.prediction_errors`, overridden
    by any the summary stores under `errors`. KV fragmentation and mean KV usage are added.
    """
    rows = []
    for other, reference in pairs:
        errors = metrics.prediction_errors(summaries[other], summaries[reference])
        for key in KV_ERROR_METRICS:
            errors[key] = metrics.relative_error(_number(summaries[other].get(key)),
                                                 _number(summaries[reference].get(key)))
        stored = summaries[other].get("errors")
        if isinstance(stored, dict):
            errors.update({key: value for key, value in stored.items() if value is None or _is_number(value)})
        rows.append({"system": other, "reference": reference, **errors})
    return pd.DataFrame(rows)


def _number(value) -> float | None:
    return float(value) if _is_number(value) else None


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


def step_timeline(steps: pd.DataFrame, requests: pd.DataFrame | None = None, max_points: int = 400) -> pd.DataFrame:
    """KV usage, fragmentation and cumulative output tokens over time, per system.

    Time is the end of each step since the system's first arrival in `requests`, or since its
    first step when it has no request, as in the run's figures. Fragmentation is
    1 - tokens stored / token slots allocated (0 when no slot is allocated). Each system keeps
    about `max_points` evenly spaced steps and its last one, so the chart stays small.
    """
    needed = {"start_time", "duration", "kv_blocks_used", "kv_blocks_total", "kv_tokens_used", "kv_slots_allocated"}
    columns = ["system", "time_s", "kv_usage", "kv_fragmentation", "output_tokens"]
    if not needed.issubset(steps.columns):
        return pd.DataFrame(columns=columns)
    systems = steps["system"].astype(str) if "system" in steps.columns else pd.Series("run", index=steps.index)
    first_arrivals = {}
    if requests is not None and {"system", "arrival_time"} <= set(requests.columns):
        first_arrivals = requests.groupby(requests["system"].astype(str))["arrival_time"].min().to_dict()
    parts = []
    for system, group in steps.groupby(systems, sort=False):
        group = group.sort_values("start_time")
        origin = float(first_arrivals.get(system, group["start_time"].iloc[0]))
        end = group["start_time"] + group["duration"]
        allocated = group["kv_slots_allocated"].astype(float)
        sampled = group["num_sampled"] if "num_sampled" in group.columns else pd.Series(0, index=group.index)
        part = pd.DataFrame({
            "system": system,
            "time_s": end - origin,
            "kv_usage": group["kv_blocks_used"] / group["kv_blocks_total"],
            "kv_fragmentation": (1.0 - group["kv_tokens_used"] / allocated).where(allocated > 0, 0.0),
            "output_tokens": sampled.cumsum(),
        })
        stride = max(1, len(part) // max_points)
        parts.append(part.iloc[sorted(set(range(0, len(part), stride)) | {len(part) - 1})])
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)
