"""Figures and report of a run folder, built from synthetic but realistic request and step records."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.metrics import SLO, prediction_errors, requests_frame, steps_frame, summarize
from experiments.plots import format_number
from experiments.report import build_report, compose, error_label, load_run
from experiments.workloads import AZURE_TRACE_CITATION
from flashserve.core.records import RequestRecord, StepRecord

FIGURES = ("throughput", "latency_cdf", "prediction", "kv_cache", "batch_queue")
SECTIONS = ("## Setup", "## Metric definitions", "## Results", "## Figures", "## Prediction error",
            "## Speed-ups", "## Limitations", "## References")
BLOCK_SIZE = 16


# synthetic run


def _measured_requests(rng: np.random.Generator, n: int, rate: float, ttft_s: float, tpot_s: float,
                       num_failed: int = 0) -> list[RequestRecord]:
    """Generate Poisson arrivals. TTFT grows with the prompt, and output tokens come gamma-distributed gaps apart."""
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    arrivals -= arrivals[0]
    records = []
    for i, arrival in enumerate(arrivals):
        prompt = int(rng.integers(16, 256))
        output = int(rng.integers(2, 64))
        if i < num_failed:
            records.append(RequestRecord(f"req-{i}", float(arrival), None, None, None, prompt, 0, 0, "error",
                                         [], "connection reset by peer"))
            continue
        scheduled = arrival + rng.exponential(0.2 * ttft_s)
        first_token = scheduled + ttft_s * (0.5 + prompt / 256)
        gaps = rng.gamma(4.0, tpot_s / 4.0, size=output - 1)
        token_times = first_token + np.concatenate([[0.0], np.cumsum(gaps)])
        records.append(RequestRecord(
            f"req-{i}", float(arrival), float(scheduled), float(first_token), float(token_times[-1]), prompt, output,
            int(rng.random() < 0.1), "stop" if rng.random() < 0.3 else "length", token_times.tolist(),
        ))
    return records


def _predicted_requests(measured: list[RequestRecord], ttft_factor: float, gap_factor: float) -> list[RequestRecord]:
    """Copy the requests with TTFT scaled by ttft_factor and every inter-token gap by gap_factor."""
    records = []
    for r in measured:
        if r.first_token_time is None:
            continue
        first_token = r.arrival_time + (r.first_token_time - r.arrival_time) * ttft_factor
        token_times = [first_token + (t - r.first_token_time) * gap_factor for t in r.token_times]
        records.append(RequestRecord(r.request_id, r.arrival_time, r.first_scheduled_time, first_token, token_times[-1],
                                     r.num_prompt_tokens, r.num_output_tokens, 0, r.finish_reason, token_times))
    return records


def _steps(rng: np.random.Generator, end_time: float, step_s: float, reserve: bool) -> list[StepRecord]:
    """Generate steps every ~step_s seconds. Running and waiting counts random-walk, and the KV cache follows the batch."""
    records, time, step = [], 0.0, 0
    running, waiting, total = 1, 0, 256
    while time < end_time:
        duration = float(step_s * rng.uniform(0.8, 1.3))
        running = int(np.clip(running + rng.integers(-1, 2), 1, 24))
        waiting = int(np.clip(waiting + rng.integers(-1, 2), 0, 12))
        prefill_seqs = int(rng.random() < 0.15)
        prefill_tokens = int(prefill_seqs * rng.integers(16, 256))
        blocks = int(min(total, running * (10 if reserve else 6) + rng.integers(0, 4)))
        allocated = blocks * BLOCK_SIZE
        reserved = int(allocated * 0.35) if reserve else 0
        used = max(1, allocated - reserved - int(rng.integers(0, BLOCK_SIZE)) * running)
        records.append(StepRecord(
            step=step, start_time=time, duration=duration, num_prefill_tokens=prefill_tokens,
            num_decode_seqs=running - prefill_seqs, num_prefill_seqs=prefill_seqs, num_context_tokens=used,
            sum_sq_prefill_tokens=prefill_tokens**2, num_sampled=running, num_running=running,
            num_waiting=waiting, num_preempted=0, kv_blocks_used=blocks, kv_blocks_total=total,
            kv_tokens_used=used, kv_slots_allocated=allocated, kv_slots_reserved=reserved,
        ))
        time += duration
        step += 1
    return records


def _write_run(run_dir: Path, tables: dict, systems: dict, *, manifest: dict | None, config: dict | None,
               workload: dict | None) -> Path:
    """Write the run files the pipeline writes: parquet tables, summary, config, manifest, workload."""
    run_dir.mkdir(parents=True, exist_ok=True)
    requests = [frame for frame, _ in tables.values()]
    steps = [frame for _, frame in tables.values() if frame is not None]
    pd.concat(requests, ignore_index=True).to_parquet(run_dir / "requests.parquet")
    if steps:
        pd.concat(steps, ignore_index=True).to_parquet(run_dir / "steps.parquet")
    run = {"workload": "azure-conv", "created": "2025-01-02T03:04:05", "model": "tiny-llama", "seed": 0,
           "slo": {"ttft": 1.0, "tpot": 0.05}}
    summary = {"run": run, "systems": systems}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if manifest is not None:
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if workload is not None:
        (run_dir / "workload.json").write_text(json.dumps(workload, indent=2))
    return run_dir


CONFIG = {
    "model": {"name": "tiny-llama", "path": None, "load_format": "dummy"},
    "engine": {"block_size": BLOCK_SIZE, "num_kv_blocks": 256, "max_num_seqs": 32, "max_num_batched_tokens": 2048},
    "workload": {"name": "azure-conv", "max_requests": 60, "time_scale": 0.1},
    "sim": {"cost_model": "fitted"},
    "hardware": {"name": "cpu", "description": "generic 2-core x86 CPU (AVX2)"},
    "systems": ["measured/continuous", "measured/static", "predicted/continuous", "predicted/static", "baseline/hf-generate"],
    "seed": 0,
}
MANIFEST = {
    "created": "2025-01-02T03:04:05+00:00",
    "command": "python -m experiments run +workload=azure-conv",
    "overrides": ["+workload=azure-conv"],
    "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
    "packages": {"python": "3.11.7", "torch": "2.13.0", "transformers": "4.56.0"},
    "hardware": {"platform": "Linux-6.1-x86_64", "cpu": "Intel Xeon (2 cores)", "cpu_count": 2, "gpus": [], "cuda": None},
    "torch_threads": 2,
    "seeds": {"workload": 0, "engine": 0},
    "trace": {"trace_path": "/data/AzureLLMInferenceTrace_conv.csv", "trace_sha256": "ab" * 32},
    "cost_model": {"path": "results/cost_models/cpu.json", "sha256": "cd" * 32},
}
WORKLOAD = {
    "name": "azure-conv",
    "transformations": ["read 19366 requests from AzureLLMInferenceTrace_conv.csv", "first 60 requests kept",
                        "arrival times scaled by 0.1 (10x the original rate)"],
    "source": {"trace_path": "/data/AzureLLMInferenceTrace_conv.csv", "trace_sha256": "ab" * 32,
               "citation": AZURE_TRACE_CITATION},
}


def _full_run(run_dir: Path, manifest=MANIFEST, config=CONFIG, workload=WORKLOAD, baseline_failures: int = 2) -> Path:
    """Write a run of five systems: two measured, their two predictions (the static one a roofline estimate), the HF baseline."""
    rng = np.random.default_rng(7)
    records = {
        "measured/continuous": _measured_requests(rng, 60, rate=4.0, ttft_s=0.05, tpot_s=0.02),
        "measured/static": _measured_requests(rng, 60, rate=4.0, ttft_s=0.4, tpot_s=0.03),
        "baseline/hf-generate": _measured_requests(rng, 60, rate=4.0, ttft_s=1.5, tpot_s=0.06, num_failed=baseline_failures),
    }
    records["predicted/continuous"] = _predicted_requests(records["measured/continuous"], ttft_factor=1.3, gap_factor=1.05)
    records["predicted/static"] = _predicted_requests(records["measured/static"], ttft_factor=0.98, gap_factor=0.6)
    kinds = {
        "measured/continuous": ("measured", "continuous", "paged"),
        "measured/static": ("measured", "static", "contiguous"),
        "predicted/continuous": ("predicted", "continuous", "paged"),
        "predicted/static": ("predicted", "static", "contiguous"),
        "baseline/hf-generate": ("baseline", "static", "contiguous"),
    }

    tables, systems = {}, {}
    for name, request_records in records.items():
        requests = requests_frame(request_records, name)
        end = float(requests["finish_time"].max())
        steps = steps_frame(_steps(rng, end, 0.02, reserve=kinds[name][2] == "contiguous"), name)
        tables[name] = (requests, steps)
        kind, batching, allocation = kinds[name]
        systems[name] = {"kind": kind, "batching": batching, "kv_allocation": allocation,
                         "estimate": name == "predicted/static",
                         **summarize(requests, steps, SLO(ttft=1.0, tpot=0.05))}
    for predicted, measured in (("predicted/continuous", "measured/continuous"), ("predicted/static", "measured/static")):
        systems[predicted]["twin"] = measured
        systems[predicted]["errors"] = prediction_errors(systems[predicted], systems[measured])
    return _write_run(run_dir, tables, systems, manifest=manifest, config=config, workload=workload)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    run_dir = _full_run(tmp_path_factory.mktemp("run"))
    return run_dir, build_report(run_dir)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Split into cells the rows of the Markdown table whose header row starts with `first_header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


# figures


def test_report_writes_every_figure(built):
    run_dir, html_path = built
    assert html_path == run_dir / "report.html"
    for name in FIGURES:
        png = run_dir / "figures" / f"{name}.png"
        pdf = run_dir / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert pdf.read_bytes()[:5] == b"%PDF-", name
        assert png.stat().st_size > 10_000, name


# markdown


def test_report_markdown_sections(built):
    run_dir, _ = built
    markdown = (run_dir / "report.md").read_text()
    assert markdown.startswith("# Flash-Serve experiment: azure-conv on tiny-llama\n")
    positions = [markdown.index(section + "\n") for section in SECTIONS]
    assert positions == sorted(positions)
    for number, name in enumerate(FIGURES, start=1):
        assert f"![Figure {number}](figures/{name}.png)" in markdown
        assert f"figures/{name}.pdf" in markdown


def test_report_setup_lists_provenance(built):
    run_dir, _ = built
    setup = (run_dir / "report.md").read_text().split("## Setup")[1].split("## Metric definitions")[0]
    assert "0123456789abcdef0123456789abcdef01234567" in setup
    assert "tiny-llama, load_format dummy" in setup
    assert "Hardware: profile cpu, generic 2-core x86 CPU (AVX2); CPU Intel Xeon (2 cores); no GPU recorded; 2 threads." in setup
    assert "Cost model: path=results/cost_models/cpu.json" in setup
    assert "Goodput SLOs: TTFT <= 1 s, TPOT <= 0.05 s." in setup
    assert "Config overrides: +workload=azure-conv." in setup
    assert "arrival times scaled by 0.1 (10x the original rate)" in setup
    assert "block_size=16" in setup
    assert "seeds.workload 0" in setup
    assert "Run created: 2025-01-02T03:04:05." in setup


def test_results_table_one_row_per_system(built):
    run_dir, _ = built
    systems = _summary(run_dir)["systems"]
    rows = {row[0]: row for row in _table_rows((run_dir / "report.md").read_text(), "System | Kind | Completed")}
    assert set(rows) == set(systems)
    continuous = rows["measured/continuous"]
    ttft = systems["measured/continuous"]["ttft"]
    assert continuous[5] == f"{format_number(ttft['mean'] * 1e3)} / {format_number(ttft['p90'] * 1e3)}"
    assert continuous[2] == "60 / 0"
    assert rows["baseline/hf-generate"][2] == "58 / 2"
    assert rows["predicted/static"][1] == "predicted, estimate"
    kv = systems["measured/static"]["kv_fragmentation"]
    assert rows["measured/static"][9] == f"{kv * 100:.1f}%"


def test_error_table_matches_summary(built):
    run_dir, _ = built
    systems = _summary(run_dir)["systems"]
    rows = _table_rows((run_dir / "report.md").read_text(), "Predicted |")
    by_metric = {(row[0], row[2]): row for row in rows}
    assert len(rows) == 2 * len(systems["predicted/continuous"]["errors"])

    within = set()
    for predicted in ("predicted/continuous", "predicted/static"):
        for key, error in systems[predicted]["errors"].items():
            row = by_metric[(predicted, error_label(key))]
            assert row[1] == systems[predicted]["twin"]
            assert row[5] == f"{error * 100:+.1f}%", key
            assert row[6] == ("yes" if abs(error) <= 0.10 else "no"), key
            within.add(row[6])
    assert within == {"yes", "no"}

    # TTFT was scaled by 1.3 for predicted/continuous, so every TTFT statistic is off by 30 %.
    assert by_metric[("predicted/continuous", "TTFT mean (ms)")][5] == "+30.0%"
    assert by_metric[("predicted/continuous", "TTFT p90 (ms)")][6] == "no"


def test_speedups_are_output_throughput_ratios(built):
    run_dir, _ = built
    systems = _summary(run_dir)["systems"]
    rows = {row[0]: row for row in _table_rows((run_dir / "report.md").read_text(), "Comparison |")}
    continuous = systems["measured/continuous"]["output_throughput"]
    static = systems["measured/static"]["output_throughput"]
    baseline = systems["baseline/hf-generate"]["output_throughput"]
    assert rows["continuous vs static batching, measured"][5] == f"{continuous / static:.2f}x"
    assert rows["continuous batching vs HF generate, measured"][5] == f"{continuous / baseline:.2f}x"
    assert "continuous vs static batching, predicted (estimate)" in rows


def test_limitations_follow_run_files(built):
    run_dir, _ = built
    markdown = (run_dir / "report.md").read_text()
    limitations = markdown.split("## Limitations")[1].split("## References")[0]
    assert "records no GPU" in limitations
    assert "The trace was transformed before replay" in limitations
    assert "random weights (load_format dummy)" in limitations
    assert "predicted/static is a roofline estimate from the peak compute and memory bandwidth of hardware profile cpu" in limitations
    assert "baseline/hf-generate: 2 of 60 requests did not complete" in limitations
    assert "connection reset by peer (2x)" in limitations
    references = markdown.split("## References")[1]
    assert "Splitwise" in references
    assert "CC-BY 4.0" in references


def test_limitations_absent_for_clean_gpu_run(tmp_path):
    manifest = {**MANIFEST, "hardware": {"cpu": "AMD EPYC", "gpus": ["NVIDIA H100 80GB HBM3"], "cuda": "12.8"}}
    config = {**CONFIG, "model": {"name": "llama", "path": "/models/llama", "load_format": "safetensors"}}
    workload = {"name": "poisson", "transformations": [], "source": {"generator": "poisson", "rate": 4.0}}
    run_dir = _full_run(tmp_path / "run", manifest=manifest, config=config, workload=workload, baseline_failures=0)
    # Without figures: the sections are composed from the same run files, in a fraction of the time.
    markdown = compose(load_run(run_dir), []).to_markdown(run_dir)
    limitations = markdown.split("## Limitations")[1].split("## References")[0]
    assert "GPU" not in limitations
    assert "transformed" not in limitations
    assert "random weights" not in limitations
    assert "did not complete" not in limitations
    assert "roofline estimate" in limitations
    assert "Splitwise" not in markdown
    assert "GPU NVIDIA H100 80GB HBM3" in markdown


# html


class _Resources(HTMLParser):
    """Parser that collects every src and href attribute and the tags of a page."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links.extend(value for name, value in attrs if name in ("src", "href") and value is not None)


def test_report_html_self_contained(built):
    run_dir, html_path = built
    page = html_path.read_text()
    parser = _Resources()
    parser.feed(page)
    assert parser.links, "the page embeds no figure"
    assert all(link.startswith("data:image/png;base64,") for link in parser.links), parser.links
    assert len(parser.links) == len(FIGURES)
    assert "script" not in parser.tags
    assert "link" not in parser.tags
    png = base64.b64decode(parser.links[0].split(",", 1)[1])
    assert png == (run_dir / "figures" / "throughput.png").read_bytes()
    assert "<table>" in page
    assert "Prediction error</h2>" in page


def test_report_rebuild_is_identical(built):
    run_dir, _ = built
    first = {name: (run_dir / name).read_bytes() for name in ("report.md", "report.html", "figures/prediction.pdf")}
    build_report(run_dir)
    for name, content in first.items():
        assert (run_dir / name).read_bytes() == content, name


# partial runs


def test_report_without_optional_files(tmp_path):
    rng = np.random.default_rng(3)
    requests = requests_frame(_measured_requests(rng, 20, rate=2.0, ttft_s=0.1, tpot_s=0.02), "measured/continuous")
    systems = {"measured/continuous": {"request_throughput": 1.5, "ttft": {"mean": 0.1, "p90": None}}}
    run_dir = _write_run(tmp_path / "run", {"measured/continuous": (requests, None)}, systems,
                         manifest=None, config=None, workload=None)

    markdown = build_report(run_dir).with_suffix(".md").read_text()
    assert (run_dir / "figures" / "throughput.png").is_file()
    assert (run_dir / "figures" / "latency_cdf.pdf").is_file()
    for name in ("prediction", "kv_cache", "batch_queue"):
        assert not (run_dir / "figures" / f"{name}.png").exists(), name
    assert "No predicted system has its measured twin" in markdown
    assert "no speed-up is reported" in markdown
    assert "| measured/continuous | measured | - / - | 1.50 | - | 100 / - |" in markdown


def test_report_with_nulls_and_orphan_prediction(tmp_path):
    rng = np.random.default_rng(5)
    measured = _measured_requests(rng, 10, rate=2.0, ttft_s=0.1, tpot_s=0.02, num_failed=10)
    requests = requests_frame(measured, "measured/http")
    steps = steps_frame([], "measured/http")
    systems = {
        "measured/http": {"kind": "measured", "num_completed": 0, "num_failed": 10, "ttft": None, "errors": None},
        "predicted/static": {"kind": "predicted", "twin": "measured/static", "request_throughput": None,
                             "output_throughput": float("nan"), "estimate": True},
        "custom/other": {},
    }
    run_dir = _write_run(tmp_path / "run", {"measured/http": (requests, steps)}, systems,
                         manifest={"gpu": []}, config={"model": "not a mapping"}, workload={"transformations": None})

    markdown = build_report(run_dir).with_suffix(".md").read_text()
    assert "Predicted without a measured twin in this run: predicted/static." in markdown
    assert "measured/http: 10 of 10 requests did not complete (finish reason error: 10" in markdown
    rows = {row[0]: row for row in _table_rows(markdown, "System | Kind | Completed")}
    assert set(rows) == {"measured/http", "predicted/static", "custom/other"}
    assert rows["custom/other"][1] == "custom"
    assert not (run_dir / "figures" / "latency_cdf.png").exists()


def test_report_rejects_folder_without_summary(tmp_path):
    with pytest.raises(ValueError, match="summary.json not found"):
        build_report(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        build_report(tmp_path / "missing")


def test_error_label_names():
    assert error_label("ttft_p90") == "TTFT p90 (ms)"
    assert error_label("request_throughput") == "Request throughput (req/s)"
    assert re.fullmatch(r"E2E mean \(ms\)", error_label("e2e_mean"))
    assert error_label("custom_metric") == "custom_metric"
