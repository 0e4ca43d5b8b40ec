"""The dashboard's results page: finding and loading runs, summary tables, and the page under AppTest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from streamlit.testing.v1 import AppTest

from experiments import metrics
from flashserve.core.records import RequestRecord, StepRecord
from flashserve.dashboard.results import (
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

APP = Path(__file__).resolve().parents[1] / "flashserve" / "dashboard" / "app.py"
PAGE_TIMEOUT_S = 60  # the first run of a test process imports torch through the flashserve package
MEASURED = "measured/continuous"
PREDICTED = "predicted/continuous"


def records(system_seed: int, ttft_s: float, gap_s: float, num_requests: int = 12):
    """Request and step records of a small run: requests every 0.1 s, `gap_s` between output tokens."""
    rng = np.random.default_rng(system_seed)
    requests = []
    for i in range(num_requests):
        arrival = 0.1 * i
        num_output = int(rng.integers(4, 10))
        first = arrival + ttft_s
        times = [first + gap_s * k for k in range(num_output)]
        requests.append(RequestRecord(
            request_id=str(i), arrival_time=arrival, first_scheduled_time=arrival, first_token_time=first,
            finish_time=times[-1], num_prompt_tokens=20, num_output_tokens=num_output, num_preemptions=0,
            finish_reason="length", token_times=times,
        ))
    steps = []
    for i in range(40):
        used = int(rng.integers(1, 8))
        steps.append(StepRecord(
            step=i, start_time=0.05 * i, duration=0.04, num_prefill_tokens=0, num_decode_seqs=3, num_prefill_seqs=0,
            num_context_tokens=60, sum_sq_prefill_tokens=0, num_sampled=3, num_running=3, num_waiting=0,
            num_preempted=0, kv_blocks_used=used, kv_blocks_total=16, kv_tokens_used=used * 16 - 5,
            kv_slots_allocated=used * 16, kv_slots_reserved=0,
        ))
    return requests, steps


def write_run(folder: Path, workload: str, ttft_scale: float = 1.0) -> Path:
    """A run folder as the pipeline writes it: tables with a `system` column, summary.json, a figure, report.md."""
    folder.mkdir(parents=True)
    tables = {}
    for seed, (system, ttft) in enumerate(((MEASURED, 0.050), (PREDICTED, 0.045))):
        request_records, step_records = records(seed, ttft * ttft_scale, 0.02)
        tables[system] = (metrics.requests_frame(request_records, system), metrics.steps_frame(step_records, system))
    requests = pd.concat([r for r, _ in tables.values()], ignore_index=True)
    steps = pd.concat([s for _, s in tables.values()], ignore_index=True)
    requests.to_parquet(folder / "requests.parquet", index=False)
    steps.to_parquet(folder / "steps.parquet", index=False)

    systems = {}
    for system, (request_frame, step_frame) in tables.items():
        kind = system.split("/")[0]
        systems[system] = {"kind": kind, **({"twin": MEASURED} if kind == "predicted" else {}),
                           **metrics.summarize(request_frame, step_frame)}
    systems[PREDICTED]["errors"] = metrics.prediction_errors(systems[PREDICTED], systems[MEASURED])
    summary = {"run": {"workload": workload, "model": "tiny-llama", "seed": 0}, "systems": systems}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))

    (folder / "figures").mkdir()
    figure = Figure(figsize=(3, 2))
    figure.add_subplot().plot([0, 1, 2], [1, 3, 2])
    figure.savefig(folder / "figures" / "throughput.png")
    (folder / "report.md").write_text(f"# Run {workload}\n\nThe simulator predicted the engine.\n")
    (folder / "config.yaml").write_text(f"workload:\n  name: {workload}\nseed: 0\n")
    return folder


@pytest.fixture
def results_dir(tmp_path) -> Path:
    root = tmp_path / "results"
    write_run(root / "2026-12-01" / "10-00-00-poisson", "poisson")
    write_run(root / "2026-12-02" / "09-30-00-azure-conv", "azure-conv", ttft_scale=2.0)
    return root


def make_app(monkeypatch, results_dir: Path) -> AppTest:
    # The live page is the default page, so point it at a closed port; these tests switch to the results page.
    monkeypatch.setenv("FLASHSERVE_SERVER_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("FLASHSERVE_RESULTS_DIR", str(results_dir))
    at = AppTest.from_file(str(APP), default_timeout=PAGE_TIMEOUT_S).run()
    return at.switch_page("views/results.py").run()


# loading

def test_find_runs_newest_first(results_dir):
    (results_dir / "2026-12-03" / "not-a-run").mkdir(parents=True)
    (results_dir / "2026-12-02" / "09-30-00-azure-conv" / ".hydra").mkdir()
    (results_dir / "2026-12-02" / "09-30-00-azure-conv" / ".hydra" / "summary.json").write_text("{}")
    runs = find_runs(results_dir)
    assert [run.relative_to(results_dir).as_posix() for run in runs] == [
        "2026-12-02/09-30-00-azure-conv", "2026-12-01/10-00-00-poisson",
    ]
    assert find_runs(results_dir / "missing") == []


def test_load_run_reads_every_file(results_dir):
    run = load_run(results_dir / "2026-12-01" / "10-00-00-poisson", results_dir)
    assert run.label == "2026-12-01/10-00-00-poisson"
    assert not run.errors
    assert run.systems == [MEASURED, PREDICTED]
    assert len(run.requests) == 24
    assert len(run.steps) == 80
    assert [f.name for f in run.figures] == ["throughput.png"]
    assert run.report.startswith("# Run poisson")
    assert list(run.configs) == ["config.yaml"]


def test_load_run_under_hidden_folder(tmp_path):
    run_dir = write_run(tmp_path / ".cache" / "results" / "2026-12-01" / "10-00-00-poisson", "poisson")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "scratch.png").write_bytes((run_dir / "figures" / "throughput.png").read_bytes())
    run = load_run(run_dir, tmp_path / ".cache" / "results")
    assert [f.relative_to(run_dir).as_posix() for f in run.figures] == ["figures/throughput.png"]


def test_load_run_survives_missing_and_broken_files(tmp_path):
    folder = tmp_path / "2026-12-05" / "08-00-00-partial"
    folder.mkdir(parents=True)
    (folder / "steps.parquet").write_bytes(b"PAR1 truncated")
    (folder / "summary.json").write_text('{"systems": ')
    run = load_run(folder, tmp_path)
    assert run.summary is None
    assert run.requests is None
    assert run.steps is None
    assert set(run.errors) == {"summary.json", "steps.parquet"}
    assert run.figures == []


# summary tables

def test_summary_tables_group_systems():
    summary = {
        "run": {"workload": "poisson", "seed": 0},
        "systems": {
            MEASURED: {"kind": "measured", "output_throughput": 100.0, "ttft": {"p50": 0.05, "p90": 0.08}},
            PREDICTED: {"kind": "predicted", "twin": MEASURED, "output_throughput": 90.0,
                        "ttft": {"p50": 0.04, "p90": 0.07}},
        },
    }
    tables = dict(summary_tables(summary))
    assert list(tables) == ["run", "systems", "systems (labels)"]
    assert tables["run"].to_dict("list") == {"name": ["workload", "seed"], "value": ["poisson", "0"]}
    numbers = tables["systems"].set_index("metric")
    assert list(numbers.columns) == [MEASURED, PREDICTED]
    assert numbers.loc["ttft.p50", PREDICTED] == 0.04
    assert numbers.loc["output_throughput", MEASURED] == 100.0
    labels = tables["systems (labels)"].set_index("field")
    assert labels.loc["twin", PREDICTED] == MEASURED
    assert pd.isna(labels.loc["twin", MEASURED])


def test_summary_tables_other_shapes():
    assert summary_tables(None) == []
    listed = dict(summary_tables([{"system": "a", "x": 1}, {"system": "b", "x": 2}]))
    assert listed["summary"]["x"].tolist() == [1, 2]
    nested = dict(summary_tables({"meta": {"git": {"commit": "abc", "dirty": False}}}))
    assert nested["meta / git"].to_dict("list") == {"name": ["commit", "dirty"], "value": ["abc", "False"]}


def test_compare_tables_relative_change():
    first = pd.DataFrame({"metric": ["a", "b", "c"], "engine": [2.0, 4.0, 0.0]})
    second = pd.DataFrame({"metric": ["a", "b"], "engine": [3.0, 2.0]})
    merged = compare_tables(first, second, ("A", "B")).set_index("metric")
    assert set(merged["column"]) == {"engine"}
    assert merged.loc["a", "change"] == pytest.approx(0.5)
    assert merged.loc["b", "change"] == pytest.approx(-0.5)
    assert "c" not in merged.index
    assert compare_tables(first, pd.DataFrame({"name": ["a"], "engine": [1.0]}), ("A", "B")) is None


# predicted vs measured

def test_prediction_errors_from_summary(results_dir):
    run = load_run(results_dir / "2026-12-01" / "10-00-00-poisson", results_dir)
    summaries = system_summaries(run)
    assert prediction_pairs(summaries) == [(PREDICTED, MEASURED)]
    errors = relative_errors(summaries, prediction_pairs(summaries)).set_index("system")
    # predicted TTFT is 45 ms against 50 ms measured
    assert errors.loc[PREDICTED, "ttft_p50"] == pytest.approx(-0.1)
    assert errors.loc[PREDICTED, "reference"] == MEASURED
    assert "kv_fragmentation" in errors.columns


def test_system_summaries_computed_without_summary(results_dir):
    run = load_run(results_dir / "2026-12-01" / "10-00-00-poisson", results_dir)
    stored = system_summaries(run)
    run.summary = None
    computed = system_summaries(run)
    assert list(computed) == [MEASURED, PREDICTED]
    assert computed[MEASURED]["ttft"]["p50"] == pytest.approx(stored[MEASURED]["ttft"]["p50"])
    assert computed[PREDICTED]["kv_fragmentation"] == pytest.approx(stored[PREDICTED]["kv_fragmentation"])
    assert prediction_pairs(computed) == [(PREDICTED, MEASURED)]


def test_latency_cdf_and_step_timeline(results_dir):
    run = load_run(results_dir / "2026-12-01" / "10-00-00-poisson", results_dir)
    latencies = request_latencies(run.requests)
    ttft = latencies[(latencies["system"] == MEASURED) & (latencies["metric"] == "ttft")]
    assert len(ttft) == 12
    assert ttft["seconds"].to_numpy() == pytest.approx(0.05)
    curve = cdf(latencies)
    measured_e2e = curve[(curve["system"] == MEASURED) & (curve["metric"] == "e2e")]
    assert measured_e2e["fraction"].iloc[-1] == 1.0
    assert measured_e2e["seconds"].is_monotonic_increasing

    timeline = step_timeline(run.steps, run.requests)
    measured = timeline[timeline["system"] == MEASURED]
    assert measured["time_s"].iloc[0] == pytest.approx(0.04)  # the first request arrives at 0 s
    late = run.requests.assign(arrival_time=run.requests["arrival_time"] - 1.0)
    assert step_timeline(run.steps, late)["time_s"].iloc[0] == pytest.approx(1.04)
    thinned = step_timeline(run.steps, max_points=7)
    thinned_measured = thinned[thinned["system"] == MEASURED]
    assert len(thinned_measured) == 9  # steps 0, 5, ..., 35 and the last one, 39
    assert thinned_measured["output_tokens"].iloc[-1] == 120
    assert measured["output_tokens"].iloc[-1] == 120
    assert measured["kv_fragmentation"].between(0, 1).all()


# the page under AppTest

def test_page_empty_folder_shows_run_command(monkeypatch, tmp_path):
    (tmp_path / "results").mkdir()
    at = make_app(monkeypatch, tmp_path / "results")
    assert not at.exception
    assert "contains no run yet" in at.info[0].value
    assert [code.value for code in at.code] == ["python -m experiments run +workload=poisson"]


def test_page_shows_one_run(monkeypatch, results_dir):
    at = make_app(monkeypatch, results_dir)
    assert not at.exception
    assert at.selectbox(key="results_run").options == ["2026-12-02/09-30-00-azure-conv", "2026-12-01/10-00-00-poisson"]
    at.selectbox(key="results_run").set_value("2026-12-01/10-00-00-poisson").run()
    assert not at.exception
    assert at.subheader[0].value == "2026-12-01/10-00-00-poisson"

    tables = [frame.value for frame in at.dataframe]
    systems_table = next(t for t in tables if "metric" in t.columns and MEASURED in t.columns)
    assert "ttft.p50" in systems_table["metric"].tolist()
    errors_table = next(t for t in tables if "reference" in t.columns)
    assert errors_table["system"].tolist() == [PREDICTED]
    assert errors_table["ttft_p50"].iloc[0] == pytest.approx(-0.1)

    assert [image.captions[0] for image in at.image] == ["figures/throughput.png"]
    assert any(md.value.startswith("# Run poisson") for md in at.markdown)
    assert any("workload:" in code.value for code in at.code)
    assert not at.warning


def test_page_reports_unreadable_file(monkeypatch, results_dir):
    (results_dir / "2026-12-02" / "09-30-00-azure-conv" / "steps.parquet").write_bytes(b"not parquet")
    at = make_app(monkeypatch, results_dir)
    assert not at.exception
    assert any("Cannot read steps.parquet" in warning.value for warning in at.warning)
    assert any("requests.parquet" in caption.value for caption in at.caption)


def test_page_compares_two_runs(monkeypatch, results_dir):
    at = make_app(monkeypatch, results_dir)
    at.radio(key="results_mode").set_value("Two runs side by side").run()
    assert not at.exception
    assert [s.value for s in at.subheader] == ["A vs B", "2026-12-02/09-30-00-azure-conv", "2026-12-01/10-00-00-poisson"]
    comparison = next(frame.value for frame in at.dataframe if "change" in frame.value.columns)
    ttft = comparison[(comparison["metric"] == "ttft.p50") & (comparison["column"] == MEASURED)].iloc[0]
    # run A (azure-conv) was written with twice the TTFT of run B (poisson)
    assert ttft["A"] == pytest.approx(0.1)
    assert ttft["B"] == pytest.approx(0.05)
    assert ttft["change"] == pytest.approx(-0.5)
    assert len(at.image) == 2
