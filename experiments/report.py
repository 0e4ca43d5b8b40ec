"""The paper-style report of one experiment run, built from the run folder alone.

`build_report(run_dir)` reads summary.json, requests.parquet, steps.parquet, config.yaml,
manifest.json and workload.json (all but summary.json may be missing), draws the figures of
`experiments.plots` under run_dir/figures/, and writes report.md and a self-contained report.html
whose figures are embedded as base64 PNG. The output depends only on those files, so rebuilding a
report from the same folder gives the same bytes.

Regenerate a report with `python -m experiments.report RUN_DIR`.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from experiments.metrics import add_latencies
from experiments.plots import (
    ERROR_THRESHOLD,
    FigureFile,
    error_keys,
    format_number,
    is_estimate,
    is_predicted,
    make_figures,
    metric_value,
    pair_errors,
    prediction_pairs,
    system_kind,
    system_order,
    twin_of,
)

logger = logging.getLogger(__name__)

VLLM_BENCHMARK_REFERENCE = "vLLM project, serving benchmark: benchmarks/benchmark_serving.py in the vLLM repository."
METRIC_DEFINITIONS = (
    "TTFT (time to first token): first token time - arrival time.",
    "TPOT (time per output token): (E2E latency - TTFT) / (output tokens - 1), per request with more than one output token.",
    "ITL (inter-token latency): every gap between consecutive output tokens of a request, pooled over requests.",
    "E2E latency: finish time - arrival time.",
    "Duration: last finish - first arrival. Request throughput = completed requests / duration; "
    "output throughput = output tokens of completed requests / duration.",
    "Goodput: completed requests per second that meet every SLO of the run (TTFT, TPOT, E2E).",
    "KV fragmentation: 1 - tokens stored / token slots allocated after each step, averaged over steps weighted "
    "by step duration. Peak KV usage is the largest share of KV blocks in use after any step.",
)


# run folder


@dataclass
class Run:
    """Contents of a run folder. A missing optional file reads as an empty table or mapping."""

    run_dir: Path
    summary: dict
    requests: pd.DataFrame
    steps: pd.DataFrame
    config: dict = field(default_factory=dict)
    config_text: str = ""
    manifest: dict = field(default_factory=dict)
    workload: dict = field(default_factory=dict)

    @property
    def systems(self) -> dict:
        systems = self.summary.get("systems")
        return {name: value or {} for name, value in systems.items()} if isinstance(systems, dict) else {}

    @property
    def info(self) -> dict:
        """The summary's `run` section: workload, created, model, seed."""
        return self.summary.get("run") if isinstance(self.summary.get("run"), dict) else {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        logger.info("%s not found, so the report leaves out the sections it feeds", path)
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rewrite it or rerun the experiment") from error
    return value if isinstance(value, dict) else {}


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        logger.info("%s not found, so the figures that need it are skipped", path)
        return pd.DataFrame(columns=["system"])
    frame = pd.read_parquet(path)
    if "system" not in frame:
        raise ValueError(f"{path} has no 'system' column; a run table is long format with one row per record and system")
    return frame


def load_run(run_dir: Path) -> Run:
    """Read a run folder. Raises ValueError when run_dir is not a folder or has no summary.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} not found; pass the folder an experiment run wrote")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{summary_path} not found; the report needs the summary.json of a finished run")

    requests = _read_table(run_dir / "requests.parquet")
    needed = {"arrival_time", "first_token_time", "finish_time", "num_output_tokens"}
    if not requests.empty and not {"ttft", "e2e", "tpot"} <= set(requests) and needed <= set(requests):
        requests = add_latencies(requests)

    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    config = yaml.safe_load(config_text) if config_text else {}
    return Run(
        run_dir=run_dir,
        summary=_read_json(summary_path),
        requests=requests,
        steps=_read_table(run_dir / "steps.parquet"),
        config=config if isinstance(config, dict) else {},
        config_text=config_text,
        manifest=_read_json(run_dir / "manifest.json"),
        workload=_read_json(run_dir / "workload.json"),
    )


# formatting


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_ms(seconds) -> str:
    return format_number(seconds * 1e3) if _is_number(seconds) else "-"


def format_percent(fraction) -> str:
    return f"{fraction * 100:.1f}%" if _is_number(fraction) else "-"


def format_error(error) -> str:
    """Format a relative error as a signed percentage, for example +4.2%."""
    return f"{error * 100:+.1f}%" if _is_number(error) else "n/a"


def within_threshold(error) -> str:
    if not _is_number(error):
        return "n/a"
    return "yes" if abs(error) <= ERROR_THRESHOLD else "no"


def _flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """List (dotted key, text) for every leaf of nested dicts. Lists of scalars are joined by commas."""
    if isinstance(value, dict):
        items = []
        for key, inner in value.items():
            items.extend(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return items
    if isinstance(value, list) and any(isinstance(inner, (dict, list)) for inner in value):
        items = []
        for index, inner in enumerate(value):
            items.extend(_flatten(inner, f"{prefix}[{index}]"))
        return items
    if isinstance(value, list):
        return [(prefix, ", ".join(str(inner) for inner in value))]
    return [(prefix, "null" if value is None else str(value))]


def _find(flat: list[tuple[str, str]], *names: str) -> str | None:
    """Return the first value whose dotted key is one of `names` or ends with "." + name."""
    for name in names:
        for key, value in flat:
            if key.lower() == name or key.lower().endswith("." + name):
                return value
    return None


def _nested(mapping: dict, *keys):
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


# document


@dataclass
class _Block:
    kind: str
    content: object


class Document:
    """A report as a list of blocks, rendered to Markdown and to standalone HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[_Block] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(_Block("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", text))

    def bullets(self, items: list) -> None:
        """Add a bullet list. An item is a string or (string, list of sub-item strings)."""
        self.blocks.append(_Block("bullets", items))

    def table(self, header: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> None:
        """Add a table of text cells. The columns in `numeric` are right-aligned."""
        self.blocks.append(_Block("table", (header, rows, numeric)))

    def figure(self, number: int, figure: FigureFile) -> None:
        self.blocks.append(_Block("figure", (number, figure)))

    def code(self, text: str) -> None:
        self.blocks.append(_Block("code", text))

    def to_markdown(self, base: Path) -> str:
        """Render Markdown with figure paths relative to `base`, the folder the file is written to."""
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            lines.extend(_markdown_block(block, base))
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        body.extend(_html_block(block) for block in self.blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1280px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
div.table { overflow-x: auto; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .92em; color: #444; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown_block(block: _Block, base: Path) -> list[str]:
    if block.kind == "heading":
        level, text = block.content
        return [f"{'#' * level} {text}"]
    if block.kind == "paragraph":
        return [block.content]
    if block.kind == "bullets":
        lines = []
        for item in block.content:
            text, children = item if isinstance(item, tuple) else (item, [])
            lines.append(f"- {text}")
            lines.extend(f"  - {child}" for child in children)
        return lines
    if block.kind == "table":
        header, rows, numeric = block.content
        separator = ["---:" if i in numeric else "---" for i in range(len(header))]
        return ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in [header, separator, *rows]]
    if block.kind == "figure":
        number, figure = block.content
        png, pdf = figure.png.relative_to(base).as_posix(), figure.pdf.relative_to(base).as_posix()
        return [f"![Figure {number}]({png})", "", f"*Figure {number}.* {figure.caption} (PDF: {pdf})"]
    if block.kind == "code":
        return ["```yaml", block.content.rstrip("\n"), "```"]
    raise ValueError(f"unknown block kind {block.kind!r}")


def _html_block(block: _Block) -> str:
    escape = html.escape
    if block.kind == "heading":
        level, text = block.content
        return f"<h{level}>{escape(text)}</h{level}>"
    if block.kind == "paragraph":
        return f"<p>{escape(block.content)}</p>"
    if block.kind == "bullets":
        items = []
        for item in block.content:
            text, children = item if isinstance(item, tuple) else (item, [])
            inner = "".join(f"<li>{escape(child)}</li>" for child in children)
            items.append(f"<li>{escape(text)}" + (f"<ul>{inner}</ul>" if inner else "") + "</li>")
        return "<ul>\n" + "\n".join(items) + "\n</ul>"
    if block.kind == "table":
        header, rows, numeric = block.content
        head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
        body = []
        for row in rows:
            cells = "".join(f"<td class=\"num\">{escape(c)}</td>" if i in numeric else f"<td>{escape(c)}</td>"
                            for i, c in enumerate(row))
            body.append(f"<tr>{cells}</tr>")
        return (f"<div class=\"table\"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
                + "\n</tbody>\n</table></div>")
    if block.kind == "figure":
        number, figure = block.content
        data = base64.b64encode(figure.png.read_bytes()).decode("ascii")
        return (f"<figure>\n<img src=\"data:image/png;base64,{data}\" alt=\"Figure {number}\">\n"
                f"<figcaption><b>Figure {number}.</b> {escape(figure.caption)} "
                f"(PDF: {escape(figure.pdf.parent.name + '/' + figure.pdf.name)})</figcaption>\n</figure>")
    if block.kind == "code":
        return f"<pre><code>{escape(block.content)}</code></pre>"
    raise ValueError(f"unknown block kind {block.kind!r}")


# sections


def _title(run: Run) -> str:
    workload = run.info.get("workload") or run.workload.get("name") or "unnamed workload"
    model = run.info.get("model") or _nested(run.config, "model", "name") or "unnamed model"
    return f"Flash-Serve experiment: {workload} on {model}"


_EMPTY_VALUES = {"", "none", "null", "false", "0", "[]", "{}", "no", "n/a"}


def _has_gpu(manifest_flat: list[tuple[str, str]]) -> bool:
    """Return True when a manifest entry whose key mentions a GPU has a value other than empty, none or 0."""
    return any("gpu" in key.lower() and value.strip().lower() not in _EMPTY_VALUES for key, value in manifest_flat)


def _hardware_text(run: Run, flat: list[tuple[str, str]]) -> str:
    parts = []
    name = _nested(run.config, "hardware", "name")
    description = _nested(run.config, "hardware", "description")
    if name:
        parts.append(f"profile {name}" + (f", {description}" if description else ""))
    cpu = _find(flat, "cpu.model", "cpu_model", "cpu.name", "cpu", "processor")
    if cpu:
        parts.append(f"CPU {cpu}")
    gpus = [value for key, value in flat if "gpu" in key.lower() and value.strip().lower() not in _EMPTY_VALUES]
    parts.append(f"GPU {', '.join(gpus)}" if _has_gpu(flat) else "no GPU recorded")
    threads = _find(flat, "num_threads", "threads", "thread_count", "torch_threads")
    if threads:
        parts.append(f"{threads} threads")
    return "; ".join(parts)


def _workload_items(run: Run) -> list:
    workload = run.workload
    name = workload.get("name") or run.info.get("workload") or "unnamed"
    source = workload.get("source") if isinstance(workload.get("source"), dict) else {}
    if source.get("trace_path"):
        sha = source.get("trace_sha256")
        source_text = f"trace {source['trace_path']}" + (f" (SHA-256 {sha})" if sha else "")
    elif source:
        source_text = "generated: " + ", ".join(f"{key}={value}" for key, value in _flatten(source))
    else:
        source_text = "source not recorded"
    items: list = [f"Workload: {name}, {source_text}."]
    transformations = [str(t) for t in workload.get("transformations") or []]
    if transformations:
        items.append(("Transformations, in order:", transformations))
    return items


def _setup_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Setup")
    flat = _flatten(run.manifest)
    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    model_name = model.get("name") or run.info.get("model") or "not recorded"
    model_text = f"Model: {model_name}"
    if model.get("load_format"):
        model_text += f", load_format {model['load_format']}"
    if model.get("path"):
        model_text += f", from {model['path']}"

    items: list = [f"Hardware: {_hardware_text(run, flat)}.", model_text + "."]
    items.extend(_workload_items(run))
    for group, label in (("engine", "Engine"), ("sim", "Simulator")):
        settings = run.config.get(group)
        if isinstance(settings, dict) and settings:
            items.append(f"{label} configuration: " + ", ".join(f"{k}={v}" for k, v in _flatten(settings)) + ".")
    cost_model = []
    for key, value in flat:
        root, _, inner = key.partition(".")
        if root == "cost_model" and value != "null":
            # The entry's own description (cost_model.cost_model) reads best without its key.
            cost_model.append(value if inner in ("", "cost_model") else f"{inner}={value}")
    if cost_model:
        items.append("Cost model: " + ", ".join(cost_model) + ".")
    slo = run.info.get("slo") if isinstance(run.info.get("slo"), dict) else {}
    if slo:
        items.append("Goodput SLOs: " + ", ".join(f"{metric.upper()} <= {limit:g} s" if _is_number(limit) else f"{metric.upper()} <= {limit}"
                                                  for metric, limit in slo.items()) + ".")

    seeds = []
    if run.info.get("seed") is not None:
        seeds.append(f"run seed {run.info['seed']}")
    seeds.extend(f"{key} {value}" for key, value in flat if "seed" in key.lower())
    if seeds:
        items.append("Seeds: " + ", ".join(dict.fromkeys(seeds)) + ".")
    commit = _find(flat, "git.commit", "git_commit", "commit")
    if commit:
        dirty = _find(flat, "git.dirty", "git_dirty", "dirty")
        items.append(f"Git commit: {commit}" + (" (uncommitted changes)" if str(dirty).lower() == "true" else "") + ".")
    command = _find(flat, "command", "argv", "cmd")
    if command:
        items.append(f"Command: {command}.")
    overrides = _find(flat, "overrides")
    if overrides:
        items.append(f"Config overrides: {overrides}.")
    if run.info.get("created"):
        items.append(f"Run created: {run.info['created']}.")
    doc.bullets(items)

    systems = run.systems
    if systems:
        doc.paragraph("Systems compared:")
        rows = []
        for name in system_order(systems):
            summary = systems[name]
            twin = twin_of(name, systems) if is_predicted(name, systems) else None
            rows.append([
                name, system_kind(name, summary), str(summary.get("batching") or "-"),
                str(summary.get("kv_allocation") or "-"), twin or "-", "yes" if is_estimate(name, systems) else "no",
            ])
        doc.table(["System", "Kind", "Batching", "KV allocation", "Measured twin", "Roofline estimate"], rows)


def _definitions_section(doc: Document) -> None:
    doc.heading(2, "Metric definitions")
    doc.paragraph("Metrics follow the definitions of vLLM's serving benchmark [1] and are computed from completed "
                  "requests (finish reason stop or length). Latencies are in milliseconds unless marked otherwise.")
    doc.bullets(list(METRIC_DEFINITIONS))


def _mean_p90(summary: dict, metric: str) -> str:
    stats = summary.get(metric) if isinstance(summary.get(metric), dict) else {}
    return f"{format_ms(stats.get('mean'))} / {format_ms(stats.get('p90'))}"


def _results_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Results")
    systems = run.systems
    if not systems:
        doc.paragraph("The summary lists no system, so there are no results to report.")
        return
    with_goodput = any(_is_number(summary.get("goodput")) for summary in systems.values())
    header = ["System", "Kind", "Completed / failed", "Requests/s", "Output tok/s", "TTFT mean / p90 (ms)",
              "TPOT mean / p90 (ms)", "ITL mean / p90 (ms)", "E2E mean / p90 (ms)", "KV fragmentation",
              "Peak KV usage", "Preemptions"] + (["Goodput (req/s)"] if with_goodput else [])
    rows = []
    for name in system_order(systems):
        summary = systems[name]
        kind = system_kind(name, summary) + (", estimate" if is_estimate(name, systems) else "")
        preemptions = summary.get("num_preemptions")
        row = [
            name, kind,
            f"{format_count(summary.get('num_completed'))} / {format_count(summary.get('num_failed'))}",
            format_number(summary.get("request_throughput")), format_number(summary.get("output_throughput")),
            _mean_p90(summary, "ttft"), _mean_p90(summary, "tpot"), _mean_p90(summary, "itl"), _mean_p90(summary, "e2e"),
            format_percent(summary.get("kv_fragmentation")), format_percent(summary.get("kv_usage_peak")),
            format_count(preemptions),
        ]
        if with_goodput:
            row.append(format_number(summary.get("goodput")))
        rows.append(row)
    doc.table(header, rows, numeric=tuple(range(2, len(header))))


def format_count(value) -> str:
    return str(int(value)) if _is_number(value) else "-"


def _figures_section(doc: Document, figures: list[FigureFile]) -> None:
    doc.heading(2, "Figures")
    if not figures:
        doc.paragraph("The run folder holds no data to draw a figure from.")
        return
    for number, figure in enumerate(figures, start=1):
        doc.figure(number, figure)


# Labels of the throughput rows of the prediction-error table. Latency keys get theirs from error_label,
# and any other key is shown as it is.
ERROR_LABELS = {
    "request_throughput": "Request throughput (req/s)",
    "output_throughput": "Output throughput (tok/s)",
    "total_token_throughput": "Total token throughput (tok/s)",
}


def error_label(key: str) -> str:
    """Return the row label of an error key, for example "TTFT p90 (ms)" for ttft_p90."""
    if key in ERROR_LABELS:
        return ERROR_LABELS[key]
    metric, _, stat = key.rpartition("_")
    if metric in ("ttft", "tpot", "itl", "e2e"):
        return f"{metric.upper()} {stat} (ms)"
    return key


def _error_value_text(summary: dict, key: str) -> str:
    value = metric_value(summary, key)
    if key.split("_", 1)[0] in ("ttft", "tpot", "itl", "e2e"):
        return format_ms(value)
    return format_number(value)


def _prediction_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Prediction error")
    systems = run.systems
    pairs = prediction_pairs(systems)
    orphans = [name for name in system_order(systems) if is_predicted(name, systems) and twin_of(name, systems) not in systems]
    if orphans:
        doc.paragraph("Predicted without a measured twin in this run: " + ", ".join(orphans) + ".")
    if not pairs:
        doc.paragraph("No predicted system has its measured twin in this run, so no prediction error is reported.")
        return
    doc.paragraph(f"Relative error = (predicted - measured) / measured, per predicted system against the measured "
                  f"system it models. A prediction is within {ERROR_THRESHOLD:.0%} when the absolute error is at most "
                  f"{ERROR_THRESHOLD:.0%}.")
    rows, notes = [], []
    for predicted, measured in pairs:
        errors = pair_errors(systems, predicted, measured)
        keys = error_keys(errors)
        for key in keys:
            error = errors.get(key)
            rows.append([predicted, measured, error_label(key), _error_value_text(systems[predicted], key),
                         _error_value_text(systems[measured], key), format_error(error), within_threshold(error)])
        known = [errors[key] for key in keys if _is_number(errors.get(key))]
        within = sum(abs(error) <= ERROR_THRESHOLD for error in known)
        note = f"{predicted}: {within} of {len(known)} metrics within {ERROR_THRESHOLD:.0%}"
        if known:
            note += f", largest absolute error {max(abs(e) for e in known) * 100:.1f}%"
        notes.append(note + ("; roofline estimate" if is_estimate(predicted, systems) else "") + ".")
    doc.table(["Predicted", "Measured twin", "Metric", "Predicted value", "Measured value", "Error",
               f"Within {ERROR_THRESHOLD:.0%}"], rows, numeric=(3, 4, 5))
    doc.bullets(notes)


# (label, numerator system, denominator system) of each speed-up, as a ratio of output throughput.
SPEEDUPS = (
    ("continuous vs static batching, measured", "measured/continuous", "measured/static"),
    ("continuous vs static batching, predicted", "predicted/continuous", "predicted/static"),
    ("continuous batching vs HF generate, measured", "measured/continuous", "baseline/hf-generate"),
    ("continuous batching vs HF generate, predicted", "predicted/continuous", "baseline/hf-generate"),
)


def _speedup_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Speed-ups")
    systems = run.systems
    rows = []
    for label, faster, slower in SPEEDUPS:
        if faster not in systems or slower not in systems:
            continue
        numerator = metric_value(systems[faster], "output_throughput")
        denominator = metric_value(systems[slower], "output_throughput")
        ratio = numerator / denominator if numerator is not None and denominator else None
        estimate = [name for name in (faster, slower) if is_estimate(name, systems)]
        rows.append([label + (" (estimate)" if estimate else ""), faster, slower, format_number(numerator),
                     format_number(denominator), f"{ratio:.2f}x" if ratio is not None else "n/a"])
    if not rows:
        doc.paragraph("The run lacks both systems of every comparison (continuous and static batching, or "
                      "continuous batching and the HF generate baseline), so no speed-up is reported.")
        return
    doc.paragraph("Speed-up = output throughput of the first system / output throughput of the second.")
    doc.table(["Comparison", "System", "Against", "Output tok/s", "Against tok/s", "Speed-up"], rows, numeric=(3, 4, 5))


def limitations(run: Run) -> list[str]:
    """List the caveats that follow from this run's own files: hardware, workload, weights, estimates, failures."""
    items = []
    flat = _flatten(run.manifest)
    systems = run.systems

    if not _has_gpu(flat):
        cpu = _find(flat, "cpu.model", "cpu_model", "cpu.name", "cpu", "processor")
        items.append("The manifest records no GPU, so measured timings come from the CPU"
                     + (f" ({cpu})" if cpu else "") + ". They compare the systems with each other but do not "
                     "give the absolute latency or throughput of GPU serving.")

    transformations = [str(t) for t in run.workload.get("transformations") or []]
    source = run.workload.get("source") if isinstance(run.workload.get("source"), dict) else {}
    if transformations and source.get("trace_path"):
        items.append("The trace was transformed before replay (" + "; ".join(transformations) + "). The results "
                     "describe this transformed workload, not the load of the original trace.")
    elif transformations:
        items.append("The workload is synthetic (" + "; ".join(transformations) + "), not a recorded trace.")

    model = run.config.get("model") if isinstance(run.config.get("model"), dict) else {}
    if str(model.get("load_format", "")).lower() == "dummy":
        items.append(f"The model ({model.get('name') or 'unnamed'}) has random weights (load_format dummy). Its "
                     "outputs are meaningless text, and the timings reflect only the architecture and the token counts.")

    estimates = [name for name in system_order(systems) if is_estimate(name, systems)]
    if estimates:
        single = len(estimates) == 1
        hardware = _nested(run.config, "hardware", "name")
        names = estimates[0] if single else ", ".join(estimates[:-1]) + " and " + estimates[-1]
        items.append(names + (" is a roofline estimate" if single else " are roofline estimates")
                     + " from the peak compute and memory bandwidth of "
                     + (f"hardware profile {hardware}" if hardware else "the hardware")
                     + ", not a cost model fitted to measurements. "
                     + ("It is" if single else "They are") + " labelled 'estimate' in the tables and figures.")

    for name in system_order(systems):
        failed = systems[name].get("num_failed")
        if _is_number(failed) and failed > 0:
            total = (systems[name].get("num_completed") or 0) + failed
            items.append(f"{name}: {int(failed)} of {int(total)} requests did not complete{_failure_detail(run, name)}. "
                         "Its latencies and throughput count completed requests only.")
    return items


def _failure_detail(run: Run, system: str) -> str:
    """Describe the finish reasons and most common error messages of a system's failed requests."""
    requests = run.requests
    if requests.empty or "finish_reason" not in requests:
        return ""
    failed = requests[(requests["system"] == system) & ~requests["finish_reason"].isin(["stop", "length"])]
    if failed.empty:
        return ""
    reasons = failed["finish_reason"].fillna("none").astype(str).value_counts().sort_index()
    detail = " (finish reason " + ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
    if "error" in failed:
        messages = failed["error"].dropna().astype(str)
        counts = messages.value_counts().sort_index().sort_values(ascending=False, kind="stable").head(3)
        if not counts.empty:
            detail += "; errors: " + "; ".join(f"{message} ({count}x)" for message, count in counts.items())
    return detail + ")"


def _limitations_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Limitations")
    items = limitations(run)
    if items:
        doc.bullets(items)
    else:
        doc.paragraph("The run's files record no known caveat.")


def _references_section(doc: Document, run: Run) -> None:
    doc.heading(2, "References")
    references = [f"[1] {VLLM_BENCHMARK_REFERENCE}"]
    source = run.workload.get("source") if isinstance(run.workload.get("source"), dict) else {}
    if source.get("citation"):
        references.append(f"[2] {source['citation']}")
    doc.bullets(references)


def _provenance_section(doc: Document, run: Run) -> None:
    doc.heading(2, "Appendix: provenance")
    flat = _flatten(run.manifest)
    if flat:
        doc.paragraph("Manifest (manifest.json):")
        doc.table(["Key", "Value"], [[key, value] for key, value in flat])
    if run.config_text:
        doc.paragraph("Resolved configuration (config.yaml):")
        doc.code(run.config_text)


def compose(run: Run, figures: list[FigureFile]) -> Document:
    """Compose the report: setup, definitions, results, figures, prediction error, speed-ups,
    limitations, references and provenance."""
    doc = Document(_title(run))
    workload_source = run.workload.get("source") if isinstance(run.workload.get("source"), dict) else {}
    intro = f"Report of the experiment run in folder {run.run_dir.name}."
    if workload_source.get("citation"):
        intro += " The workload replays the Azure LLM inference trace [2]."
    doc.paragraph(intro)

    _setup_section(doc, run)
    _definitions_section(doc)
    _results_section(doc, run)
    _figures_section(doc, figures)
    _prediction_section(doc, run)
    _speedup_section(doc, run)
    _limitations_section(doc, run)
    _references_section(doc, run)
    _provenance_section(doc, run)
    return doc


def build_report(run_dir: Path) -> Path:
    """Draw the figures of a run folder and write its report.md and report.html.

    Returns the path of report.html. Raises ValueError when run_dir is not a folder or has no summary.json.
    """
    run = load_run(Path(run_dir))
    figures = make_figures(run.requests, run.steps, run.systems, run.run_dir / "figures")
    doc = compose(run, figures)

    markdown_path = run.run_dir / "report.md"
    html_path = run.run_dir / "report.html"
    markdown_path.write_text(doc.to_markdown(run.run_dir), encoding="utf-8")
    html_path.write_text(doc.to_html(), encoding="utf-8")
    logger.info("wrote %s and %s with %d figures", markdown_path, html_path, len(figures))
    return html_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the figures and report of an experiment run folder.")
    parser.add_argument("run_dir", type=Path, help="run folder with summary.json and the run's tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(build_report(args.run_dir))


if __name__ == "__main__":
    main()
