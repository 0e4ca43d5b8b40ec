"""Figures of an experiment run: throughput, latency CDFs, predicted against measured metrics,
and the KV cache, batch and queue over time.

Each figure is saved as PNG (embedded in the HTML report) and PDF (for papers) under the run's
figures/ folder. Figures are drawn on `matplotlib.figure.Figure` objects without pyplot, so
importing this module selects no backend and leaves no global figure state. Every system keeps
one colour in all figures. Predicted systems are drawn hatched in bar charts and dashed in latency CDFs.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from experiments.metrics import ERROR_METRICS, completed, prediction_errors

logger = logging.getLogger(__name__)

# Known systems in report order. A predicted system gets the light shade of its measured twin's hue.
_TAB20 = matplotlib.colormaps["tab20"].colors
SYSTEM_COLORS = {
    "measured/continuous": _TAB20[0],
    "predicted/continuous": _TAB20[1],
    "measured/static": _TAB20[2],
    "predicted/static": _TAB20[3],
    "baseline/hf-generate": _TAB20[4],
    "measured/http": _TAB20[8],
}
# Colours for systems outside SYSTEM_COLORS, handed out in sorted name order.
_EXTRA_COLORS = [_TAB20[i] for i in (6, 10, 12, 14, 16, 18, 7, 11, 13, 15, 17, 19)]
ERROR_THRESHOLD = 0.10  # a prediction counts as accurate when |relative error| <= 10 %
PREDICTED_HATCH = "//"
MAX_VECTOR_POINTS = 5000  # lines with more points are rasterized in the PDF to keep it small


@dataclass(frozen=True)
class FigureFile:
    """One saved figure: its file stem, the PNG and PDF paths and a caption for the report."""

    name: str
    png: Path
    pdf: Path
    caption: str


# systems


def system_order(names) -> list[str]:
    """Sort system names: known systems in SYSTEM_COLORS order, then any others by name."""
    names = set(names)
    known = [name for name in SYSTEM_COLORS if name in names]
    return known + sorted(names - set(known))


def system_colors(names) -> dict[str, tuple]:
    """Map each system to its colour: a fixed one for known systems, the next extra colour otherwise."""
    ordered = system_order(names)
    extras = iter(_EXTRA_COLORS * (1 + len(ordered) // len(_EXTRA_COLORS)))
    return {name: SYSTEM_COLORS[name] if name in SYSTEM_COLORS else next(extras) for name in ordered}


def system_kind(name: str, summary: dict | None) -> str:
    """Return "measured", "predicted" or "baseline": the summary's `kind`, else the name's prefix."""
    kind = (summary or {}).get("kind")
    return kind if kind else name.split("/", 1)[0]


def is_predicted(name: str, systems: dict) -> bool:
    return system_kind(name, systems.get(name)) == "predicted"


def is_estimate(name: str, systems: dict) -> bool:
    return bool((systems.get(name) or {}).get("estimate"))


def twin_of(name: str, systems: dict) -> str | None:
    """Return the measured system a predicted system models: its `twin`, else measured/<same suffix>."""
    twin = (systems.get(name) or {}).get("twin")
    if twin:
        return twin
    if "/" in name:
        return "measured/" + name.split("/", 1)[1]
    return None


def prediction_pairs(systems: dict) -> list[tuple[str, str]]:
    """List (predicted, measured twin) for every predicted system whose twin is in the summary."""
    pairs = []
    for name in system_order(systems):
        if is_predicted(name, systems):
            twin = twin_of(name, systems)
            if twin in systems:
                pairs.append((name, twin))
    return pairs


def error_keys(errors: dict) -> list[str]:
    """Sort error keys: ERROR_METRICS order first, then any other keys by name."""
    standard = [metric if stat is None else f"{metric}_{stat}" for metric, stat in ERROR_METRICS]
    return [key for key in standard if key in errors] + sorted(set(errors) - set(standard))


def metric_value(summary: dict, key: str) -> float | None:
    """Look up a summary value by error key: `request_throughput` directly, `ttft_p90` as ttft -> p90.

    Returns None for a missing, null or non-finite value.
    """
    value = summary.get(key)
    if value is None and "_" in key:
        metric, stat = key.rsplit("_", 1)
        nested = summary.get(metric)
        if isinstance(nested, dict):
            value = nested.get(stat)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return float(value)
    return None


def pair_errors(systems: dict, predicted: str, measured: str) -> dict[str, float | None]:
    """Collect the relative errors of a predicted system: those stored in the summary, and each missing
    one computed from the two summaries with `experiments.metrics.prediction_errors`."""
    computed = prediction_errors(systems[predicted], systems[measured])
    stored = systems[predicted].get("errors") or {}
    return {**computed, **stored}


# drawing helpers


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, out_dir: Path, name: str, caption: str) -> FigureFile:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    # NOTE: no dates or software versions in the files, so a rebuilt report is byte-identical.
    fig.savefig(png, dpi=150, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "Creator": None, "Producer": None})
    logger.info("wrote figure %s", png)
    return FigureFile(name, png, pdf, caption)


@contextmanager
def _style():
    """Seaborn's whitegrid look at paper scale, applied only inside the `with` block."""
    rc = {"axes.titleweight": "bold", "legend.frameon": False, "hatch.linewidth": 0.8}
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.15), matplotlib.rc_context(rc):
        yield


def format_number(value) -> str:
    """Format a number with three significant digits, or all integer digits from 1000 up, and "-" when missing."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _linestyle(name: str, systems: dict) -> str:
    return "--" if is_predicted(name, systems) else "-"


def _time_origins(requests: pd.DataFrame, steps: pd.DataFrame) -> dict[str, float]:
    """Find the time each system's run started: its first arrival, else its first step."""
    origins = {}
    if not steps.empty:
        origins.update(steps.groupby("system")["start_time"].min().astype(float).to_dict())
    if not requests.empty and "arrival_time" in requests:
        arrivals = requests.dropna(subset=["arrival_time"]).groupby("system")["arrival_time"].min()
        origins.update(arrivals.astype(float).to_dict())
    return origins


def _legend_below(fig: Figure, handles, labels) -> None:
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6))


# figures


def plot_throughput(systems: dict, out_dir: Path) -> FigureFile | None:
    """Draw bars of request throughput (req/s) and output token throughput (tok/s) per system."""
    names = [n for n in system_order(systems) if metric_value(systems[n], "request_throughput") is not None
             or metric_value(systems[n], "output_throughput") is not None]
    if not names:
        return None
    colors = system_colors(systems)

    with _style():
        fig = _new_figure(max(7.0, 1.6 * len(names) + 3.0), 4.2)
        panels = [("request_throughput", "Request throughput (req/s)"), ("output_throughput", "Output throughput (tok/s)")]
        for ax, (key, label) in zip(fig.subplots(1, 2), panels):
            x = np.arange(len(names))
            for i, name in enumerate(names):
                value = metric_value(systems[name], key)
                if value is None:
                    ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize="small")
                    continue
                hatch = PREDICTED_HATCH if is_predicted(name, systems) else None
                ax.bar(i, value, color=colors[name], hatch=hatch, edgecolor="0.25", linewidth=0.8)
                text = format_number(value) + ("\nestimate" if is_estimate(name, systems) else "")
                ax.annotate(text, (i, value), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize="small")
            ax.set_xticks(x, names, rotation=25, ha="right")
            ax.set_ylabel(label)
            ax.set_title(label.split(" (")[0])
            ax.margins(y=0.18)

        if any(is_predicted(n, systems) for n in names):
            handles = [Patch(facecolor="white", edgecolor="0.25"), Patch(facecolor="white", edgecolor="0.25", hatch=PREDICTED_HATCH)]
            _legend_below(fig, handles, ["measured or baseline", "predicted (simulator)"])
        caption = "Request throughput (completed requests per second) and output token throughput per system."
        if any(is_predicted(n, systems) for n in names):
            caption += " Hatched bars are simulator predictions."
        if any(is_estimate(n, systems) for n in names):
            caption += " Bars labelled 'estimate' are roofline estimates, not fitted predictions."
        return _save(fig, out_dir, "throughput", caption)


# Latency panels: column, axis label, factor from seconds to the axis unit.
LATENCY_PANELS = (("ttft", "TTFT (ms)", 1e3), ("tpot", "TPOT (ms)", 1e3), ("e2e", "E2E latency (s)", 1.0))


def plot_latency_cdfs(requests: pd.DataFrame, systems: dict, out_dir: Path) -> FigureFile | None:
    """Draw empirical CDFs of TTFT, TPOT and E2E latency of completed requests, one line per system."""
    if requests.empty or "finish_reason" not in requests:
        return None
    done = completed(requests)
    names = system_order(set(done["system"]))
    if not names:
        return None
    colors = system_colors(set(systems) | set(names))
    log_axes = []

    with _style():
        fig = _new_figure(13.0, 4.2)
        handles, labels = [], []
        for ax, (column, label, scale) in zip(fig.subplots(1, 3), LATENCY_PANELS):
            positive = []
            for name in names:
                if column not in done:
                    continue
                values = done.loc[done["system"] == name, column].to_numpy(dtype=float) * scale
                values = np.sort(values[np.isfinite(values)])
                if values.size == 0:
                    continue
                fraction = np.arange(1, values.size + 1) / values.size
                (line,) = ax.step(values, fraction, where="post", color=colors[name],
                                  linestyle=_linestyle(name, systems), linewidth=1.8)
                positive.extend(values[values > 0][[0, -1]] if (values > 0).any() else [])
                if name not in labels:
                    handles.append(line)
                    labels.append(name)
            # A log axis keeps systems that differ by orders of magnitude readable.
            if positive and max(positive) / min(positive) > 100:
                ax.set_xscale("log")
                log_axes.append(label.split(" (")[0])
            ax.set_xlabel(label)
            ax.set_ylabel("Fraction of requests")
            ax.set_ylim(0, 1.02)
            ax.set_title(label.split(" (")[0])
        _legend_below(fig, handles, labels)

        caption = ("Cumulative distribution of TTFT, TPOT and end-to-end latency over completed requests; "
                   "dashed lines are simulator predictions.")
        if log_axes:
            caption += f" Logarithmic x axis for {', '.join(log_axes)}."
        return _save(fig, out_dir, "latency_cdf", caption)


# Panels of the predicted-against-measured figure: title, error keys, axis label, factor from the summary unit.
PREDICTION_PANELS = (
    ("Request throughput", ("request_throughput",), "req/s", 1.0),
    ("Output throughput", ("output_throughput",), "tok/s", 1.0),
    ("TTFT", ("ttft_mean", "ttft_p50", "ttft_p90"), "ms", 1e3),
    ("TPOT", ("tpot_mean", "tpot_p50", "tpot_p90"), "ms", 1e3),
    ("E2E latency", ("e2e_mean", "e2e_p50", "e2e_p90"), "s", 1.0),
)


def plot_prediction(systems: dict, out_dir: Path) -> FigureFile | None:
    """Draw predicted against measured throughput, TTFT, TPOT and E2E (mean, p50, p90), one panel per
    metric, with each prediction's relative error in percent above its bar."""
    pairs = prediction_pairs(systems)
    if not pairs:
        return None
    colors = system_colors(systems)
    errors = {predicted: pair_errors(systems, predicted, measured) for predicted, measured in pairs}
    bar_width = 0.8 / (2 * len(pairs))

    with _style():
        fig = _new_figure(13.0, 7.6)
        axes = fig.subplots(2, 3).ravel()
        for ax, (title, keys, unit, scale) in zip(axes, PREDICTION_PANELS):
            for group, key in enumerate(keys):
                for p, (predicted, measured) in enumerate(pairs):
                    left = group - 0.4 + 2 * p * bar_width + bar_width / 2
                    measured_value = metric_value(systems[measured], key)
                    predicted_value = metric_value(systems[predicted], key)
                    if measured_value is not None:
                        ax.bar(left, measured_value * scale, bar_width, color=colors[measured], edgecolor="0.25", linewidth=0.8)
                    if predicted_value is not None:
                        ax.bar(left + bar_width, predicted_value * scale, bar_width, color=colors[predicted],
                               hatch=PREDICTED_HATCH, edgecolor="0.25", linewidth=0.8)
                    _annotate_error(ax, left + bar_width, predicted_value, scale, errors[predicted].get(key))
            if len(keys) > 1:
                ax.set_xticks(range(len(keys)), [key.rsplit("_", 1)[1] for key in keys])
            else:
                ax.set_xticks([])
            ax.set_ylabel(f"{title} ({unit})")
            ax.set_title(title)
            ax.margins(y=0.2)

        legend_ax = axes[-1]
        legend_ax.axis("off")
        handles, labels = [], []
        for predicted, measured in pairs:
            handles.append(Patch(facecolor=colors[measured], edgecolor="0.25"))
            labels.append(measured)
            handles.append(Patch(facecolor=colors[predicted], edgecolor="0.25", hatch=PREDICTED_HATCH))
            labels.append(predicted + (" (estimate)" if is_estimate(predicted, systems) else ""))
        legend_ax.legend(handles, labels, loc="center", title="System")

        caption = ("Predicted against measured metrics. Each hatched bar is a prediction and the solid bar to its "
                   "left is its measured twin. The label above it is the relative error (predicted - measured) / "
                   f"measured, red where it exceeds {ERROR_THRESHOLD:.0%}.")
        return _save(fig, out_dir, "prediction", caption)


def _annotate_error(ax, x: float, value: float | None, scale: float, error: float | None) -> None:
    text = "n/a" if error is None else f"{error * 100:+.1f}%"
    color = "0.2" if error is None or abs(error) <= ERROR_THRESHOLD else "tab:red"
    y = 0.0 if value is None else value * scale
    ax.annotate(text, (x, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                fontsize="x-small", color=color, rotation=90 if abs(y) > 0 else 0)


def _plot_time_series(steps: pd.DataFrame, requests: pd.DataFrame, systems: dict, panels, out_dir: Path,
                      name: str, caption: str) -> FigureFile | None:
    """Draw one row per system and one column per panel, sharing the time axis and each column's y axis.

    `panels` contains (axis label, function from a system's steps to one value per step).
    """
    if steps.empty or "start_time" not in steps:
        return None
    names = system_order(set(steps["system"]))
    colors = system_colors(set(systems) | set(names))
    origins = _time_origins(requests, steps)

    with _style():
        fig = _new_figure(5.5 * len(panels) + 1.0, 1.9 * len(names) + 1.0)
        axes = fig.subplots(len(names), len(panels), sharex=True, sharey="col", squeeze=False)
        for row, system in zip(axes, names):
            frame = steps[steps["system"] == system].sort_values("start_time", kind="stable")
            times = frame["start_time"].to_numpy(dtype=float) - origins.get(system, 0.0)
            for ax, (label, values_of) in zip(row, panels):
                ax.plot(times, values_of(frame), drawstyle="steps-post", color=colors[system], linewidth=1.1,
                        rasterized=len(times) > MAX_VECTOR_POINTS)
                ax.set_title(system, loc="left", fontsize="medium", fontweight="normal")
                ax.set_ylabel(label)
        for ax in axes[-1]:
            ax.set_xlabel("Time since the first arrival (s)")
        return _save(fig, out_dir, name, caption)


def _ratio(numerator: pd.Series, denominator: pd.Series) -> np.ndarray:
    numerator = numerator.to_numpy(dtype=float)
    denominator = denominator.to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def plot_kv_cache(steps: pd.DataFrame, requests: pd.DataFrame, systems: dict, out_dir: Path) -> FigureFile | None:
    """Draw KV block usage (kv_blocks_used / kv_blocks_total) and fragmentation
    (1 - kv_tokens_used / kv_slots_allocated) per step, in percent."""
    panels = (
        ("KV blocks used (%)", lambda f: 100 * _ratio(f["kv_blocks_used"], f["kv_blocks_total"])),
        ("KV fragmentation (%)", lambda f: 100 * (1 - _ratio(f["kv_tokens_used"], f["kv_slots_allocated"]))),
    )
    caption = ("KV cache over time, one row per system: the share of KV blocks in use, and fragmentation, "
               "1 - tokens stored / token slots allocated, after each step. Steps with no block allocated leave "
               "a gap.")
    if "baseline/hf-generate" in set(steps.get("system", [])):
        caption += (" The HF generate baseline counts the padded cache of its current batch as the whole cache, "
                    "so its usage is 100 % by construction and its fragmentation is padding.")
    return _plot_time_series(steps, requests, systems, panels, out_dir, "kv_cache", caption)


def plot_batch_queue(steps: pd.DataFrame, requests: pd.DataFrame, systems: dict, out_dir: Path) -> FigureFile | None:
    """Draw the sequences scheduled per step (prefill plus decode) and the waiting requests per step."""
    panels = (
        ("Batch size (sequences)", lambda f: f["num_prefill_seqs"].to_numpy(dtype=float) + f["num_decode_seqs"].to_numpy(dtype=float)),
        ("Queue length (requests)", lambda f: f["num_waiting"].to_numpy(dtype=float)),
    )
    caption = ("Batch size (prefill plus decode sequences scheduled in a step) and queue length (requests "
               "waiting for admission) over time, one row per system.")
    return _plot_time_series(steps, requests, systems, panels, out_dir, "batch_queue", caption)


def make_figures(requests: pd.DataFrame, steps: pd.DataFrame, systems: dict, out_dir: Path) -> list[FigureFile]:
    """Draw every figure the run's data allows, in report order. A figure without data is skipped."""
    figures = [
        plot_throughput(systems, out_dir),
        plot_latency_cdfs(requests, systems, out_dir),
        plot_prediction(systems, out_dir),
        plot_kv_cache(steps, requests, systems, out_dir),
        plot_batch_queue(steps, requests, systems, out_dir),
    ]
    return [figure for figure in figures if figure is not None]
