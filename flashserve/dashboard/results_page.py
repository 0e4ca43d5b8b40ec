"""Results page: one experiment run's tables, figures and predicted-vs-measured panels, or two runs side by side."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from flashserve.dashboard import charts
from flashserve.dashboard.results import (
    RUN_MARKERS,
    Run,
    cdf,
    compare_tables,
    find_runs,
    load_run,
    prediction_pairs,
    relative_errors,
    request_latencies,
    step_timeline,
    summary_tables,
    system_summaries,
)
from flashserve.dashboard.settings import RUN_COMMAND

ONE_RUN = "One run"
TWO_RUNS = "Two runs side by side"


def render() -> None:
    results_dir = Path(st.session_state["results_dir"])
    st.title("Results")
    runs = find_runs(results_dir)
    if not runs:
        where = "does not exist" if not results_dir.is_dir() else "contains no run yet"
        st.info(f"The results folder `{results_dir}` {where}. A run folder holds at least one of "
                f"{', '.join(RUN_MARKERS)}. Make a run with:")
        st.code(RUN_COMMAND, language="bash")
        return

    labels = {path.relative_to(results_dir).as_posix(): path for path in runs}
    mode = st.radio("View", [ONE_RUN, TWO_RUNS], horizontal=True, key="results_mode")
    if mode == ONE_RUN:
        label = st.selectbox("Run", list(labels), key="results_run")
        _show_run(_load(labels[label], results_dir), key="single")
        return

    if len(labels) < 2:
        st.info(f"Only one run in `{results_dir}`; make another to compare two.")
        return
    left, right = st.columns(2)
    first_label = left.selectbox("Run A", list(labels), index=0, key="results_run_a")
    second_label = right.selectbox("Run B", list(labels), index=1, key="results_run_b")
    first = _load(labels[first_label], results_dir)
    second = _load(labels[second_label], results_dir)
    _compare_summaries(first, second)
    left, right = st.columns(2)
    with left:
        _show_run(first, key="a")
    with right:
        _show_run(second, key="b")


def _load(path: Path, results_dir: Path) -> Run:
    return _load_cached(str(path), str(results_dir), _signature(path))


@st.cache_data(max_entries=16, show_spinner=False)
def _load_cached(path: str, results_dir: str, signature: tuple) -> Run:
    """Cached load_run; `signature` changes whenever a file of the run changes, so a finished run reloads."""
    return load_run(path, results_dir)


def _signature(path: Path) -> tuple:
    entries = []
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                stat = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            entries.append((os.path.join(directory, name), stat.st_mtime_ns, stat.st_size))
    return tuple(sorted(entries))


def _show_run(run: Run, key: str) -> None:
    st.subheader(run.label)
    present = [name for name in RUN_MARKERS if (run.path / name).is_file()]
    st.caption(f"{run.path} · {', '.join(present) or 'no known files'} · {len(run.figures)} figures")
    for name, reason in run.errors.items():
        st.warning(f"Cannot read {name}: {reason}")

    summary_tab, panels_tab, figures_tab, report_tab, config_tab = st.tabs(
        ["Summary", "Predicted vs measured", "Figures", "Report", "Config"]
    )
    with summary_tab:
        _summary(run)
    with panels_tab:
        _predicted_vs_measured(run, key)
    with figures_tab:
        _figures(run)
    with report_tab:
        if run.report is None:
            st.info("This run has no report.md.")
        else:
            # NOTE: images that report.md links by relative path do not load here; the Figures tab shows them.
            st.markdown(run.report)
    with config_tab:
        if not run.configs:
            st.info("This run has none of config.yaml, overrides.yaml, manifest.json or workload.json.")
        for name, text in run.configs.items():
            st.markdown(f"**{name}**")
            st.code(text, language="json" if name.endswith(".json") else "yaml")


def _summary(run: Run) -> None:
    if run.summary is None:
        st.info("This run has no summary.json.")
    for title, table in summary_tables(run.summary):
        st.markdown(f"**{title}**")
        st.dataframe(table, hide_index=True)

    counts = []
    for name, frame in (("requests", run.requests), ("steps", run.steps)):
        if frame is None:
            continue
        systems = frame["system"].astype(str) if "system" in frame.columns else pd.Series("run", index=frame.index)
        counts.append(systems.value_counts(sort=False).rename(name))
    if counts:
        st.markdown("**records per system**")
        table = pd.concat(counts, axis=1).fillna(0).astype(int)
        table.index.name = "system"
        st.dataframe(table.reset_index(), hide_index=True)


def _predicted_vs_measured(run: Run, key: str) -> None:
    summaries = system_summaries(run)
    if len(summaries) > 1:
        _error_table(summaries, key)
    if run.requests is None and run.steps is None:
        st.info("This run has neither requests.parquet nor steps.parquet, so there are no distributions to plot.")
        return

    if run.requests is not None:
        latencies = cdf(request_latencies(run.requests))
        if latencies.empty:
            st.info("requests.parquet has no completed request with arrival, first token and finish times.")
        else:
            left, right = st.columns(2)
            left.altair_chart(charts.latency_cdf_chart(latencies, "ttft", "TTFT"), width="stretch")
            right.altair_chart(charts.latency_cdf_chart(latencies, "e2e", "End-to-end latency"),
                               width="stretch")
    if run.steps is not None:
        timeline = step_timeline(run.steps, run.requests)
        if timeline.empty:
            st.info("steps.parquet lacks the time or KV cache columns of a step record.")
            return
        st.altair_chart(charts.system_timeline_chart(timeline, "output_tokens", "Cumulative output tokens"),
                        width="stretch")
        left, right = st.columns(2)
        left.altair_chart(charts.system_timeline_chart(timeline, "kv_usage", "KV cache usage", percent=True),
                          width="stretch")
        right.altair_chart(
            charts.system_timeline_chart(timeline, "kv_fragmentation", "KV fragmentation", percent=True),
            width="stretch",
        )


def _error_table(summaries: dict[str, dict], key: str) -> None:
    """Relative errors of each predicted system against its measured twin, or of every system against a chosen one."""
    pairs = prediction_pairs(summaries)
    if pairs:
        st.markdown("**Prediction error: (predicted - measured) / measured**")
    else:
        names = list(summaries)
        reference = st.selectbox("Reference system", names, key=f"reference_{key}")
        pairs = [(name, reference) for name in names if name != reference]
        st.markdown(f"**Relative difference from {reference}**")
    errors = relative_errors(summaries, pairs)
    value_columns = [c for c in errors.columns if c not in ("system", "reference")]
    st.dataframe(
        errors,
        hide_index=True,
        column_config={c: st.column_config.NumberColumn(format="percent") for c in value_columns},
    )


def _figures(run: Run) -> None:
    if not run.figures:
        st.info("This run has no PNG figures.")
        return
    for start in range(0, len(run.figures), 2):
        columns = st.columns(2)
        for column, figure in zip(columns, run.figures[start:start + 2]):
            column.image(str(figure), caption=figure.relative_to(run.path).as_posix())


def _compare_summaries(first: Run, second: Run) -> None:
    tables_a = dict(summary_tables(first.summary))
    tables_b = dict(summary_tables(second.summary))
    drew_comparison = False
    for title in tables_a:
        if title not in tables_b:
            continue
        merged = compare_tables(tables_a[title], tables_b[title], ("A", "B"))
        if merged is None:
            continue
        if not drew_comparison:
            st.subheader("A vs B")
            st.caption(f"A = {first.label}, B = {second.label}; change = (B - A) / |A|")
            drew_comparison = True
        st.markdown(f"**{title}**")
        st.dataframe(merged, hide_index=True,
                     column_config={"change": st.column_config.NumberColumn(format="percent")})
    if not drew_comparison:
        st.caption("The two runs' summaries share no table with numeric values to compare.")
