"""End-to-end tests of `python -m experiments`: a tiny run, report, sweep, compare, calibrate and
every rejected input, each through the command line as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from experiments.metrics import summarize
from sim.cost_model import FittedCostModel

REPO = Path(__file__).resolve().parents[1]
MICRO_LLAMA = REPO / "tests" / "data" / "micro-llama.yaml"
DEFAULT_SYSTEMS = ["measured/continuous", "measured/static", "predicted/continuous", "predicted/static",
                   "baseline/hf-generate"]
RUN_FILES = ["config.yaml", "overrides.yaml", ".hydra/config.yaml", "manifest.json", "workload.json",
             "requests.parquet", "steps.parquet", "summary.json", "report.md", "report.html"]
SUMMARY_KEYS = ["request_throughput", "output_throughput", "ttft", "tpot", "itl", "e2e", "kv_fragmentation",
                "kv_fragmentation_internal", "kv_fragmentation_reservation", "kv_usage_peak", "num_preemptions"]


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m experiments ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_folders(results: Path) -> list[Path]:
    """Folders that look like a run: any folder under `results` that contains a config.yaml or a .hydra/."""
    if not results.exists():
        return []
    return [p for p in results.rglob("*")
            if p.is_dir() and p.name != ".hydra" and ((p / "config.yaml").exists() or (p / ".hydra").exists())]


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory) -> Path:
    """A config search path with the micro test model as model option `micro-llama`."""
    conf = tmp_path_factory.mktemp("conf")
    (conf / "model").mkdir()
    shutil.copy(MICRO_LLAMA, conf / "model" / "micro-llama.yaml")
    return conf


@pytest.fixture(scope="module")
def cost_file(tmp_path_factory) -> Path:
    """A precomputed fitted cost model, so that no test pays for a calibration."""
    path = tmp_path_factory.mktemp("cost") / "micro.json"
    FittedCostModel({"intercept": 2e-3, "num_prefill_tokens": 5e-6, "num_decode_seqs": 2e-4},
                    {"model": "micro-llama", "num_steps": 0}).save(path)
    return path


def tiny(conf_dir: Path, cost_file: Path, results: Path) -> list[str]:
    """Overrides that shrink a run to a few seconds: micro model, six short requests."""
    return [
        f"hydra.searchpath=[file://{conf_dir}]", "model=micro-llama",
        "engine.max_model_len=256", "engine.num_kv_blocks=64", "engine.max_num_seqs=4", "engine.warmup_requests=1",
        "workload.num_requests=6", "workload.rate=50",
        "workload.prompt_len.mean=16", "workload.prompt_len.high=64",
        "workload.output_len.mean=4", "workload.output_len.low=2", "workload.output_len.high=8",
        f"sim.cost_file={cost_file}", "progress=false", f"results_dir={results}",
    ]


@pytest.fixture(scope="module")
def tiny_run(conf_dir, cost_file, tmp_path_factory) -> Path:
    """The folder of one tiny run of all default systems, report included."""
    results = tmp_path_factory.mktemp("results")
    result = run_cli("run", "+workload=poisson", *tiny(conf_dir, cost_file, results))
    assert result.returncode == 0, result.stderr[-3000:]
    folders = run_folders(results)
    assert len(folders) == 1, folders
    return folders[0]


# a tiny run


def test_run_writes_every_output(tiny_run):
    for name in RUN_FILES:
        assert (tiny_run / name).is_file(), name
    assert tiny_run.name.endswith("-poisson")
    assert tiny_run.parent.name.count("-") == 2  # results/<date>/<time>-<workload>/
    figures = tiny_run / "figures"
    assert list(figures.glob("*.png")), "no PNG figure"
    assert list(figures.glob("*.pdf")), "no PDF figure"


def test_run_summary_schema(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["run"]) >= {"workload", "created", "model", "seed"}
    assert summary["run"]["workload"] == "poisson"
    assert summary["run"]["model"] == "micro-llama"
    assert list(summary["systems"]) == DEFAULT_SYSTEMS

    for name, entry in summary["systems"].items():
        assert entry["kind"] == name.split("/")[0]
        assert {"batching", "kv_allocation", "estimate"} <= set(entry)
        for key in SUMMARY_KEYS:
            assert key in entry, f"{name} lacks {key}"
        assert set(entry["ttft"]) == {"mean", "p50", "p90", "p99"}
        assert entry["num_completed"] == 6

    predicted = summary["systems"]["predicted/static"]
    assert predicted["twin"] == "measured/static"
    assert predicted["estimate"] is False
    assert predicted["errors"]["request_throughput"] is not None
    assert summary["systems"]["measured/continuous"]["kv_allocation"] == "paged"
    assert summary["systems"]["measured/static"]["kv_allocation"] == "contiguous"


def test_run_summary_matches_tables(tiny_run):
    requests = pd.read_parquet(tiny_run / "requests.parquet")
    steps = pd.read_parquet(tiny_run / "steps.parquet")
    summary = json.loads((tiny_run / "summary.json").read_text())
    name = "measured/continuous"
    expected = summarize(requests[requests["system"] == name], steps[steps["system"] == name])
    assert summary["systems"][name]["request_throughput"] == pytest.approx(expected["request_throughput"])
    assert summary["systems"][name]["kv_fragmentation"] == pytest.approx(expected["kv_fragmentation"])


def test_run_common_random_numbers(tiny_run):
    requests = pd.read_parquet(tiny_run / "requests.parquet").sort_values(["system", "request_id"])
    assert set(requests["system"]) == set(DEFAULT_SYSTEMS)
    by_system = {name: frame.reset_index(drop=True) for name, frame in requests.groupby("system")}
    reference = by_system["measured/continuous"]
    assert len(reference) == 6
    for name, frame in by_system.items():
        assert frame["request_id"].tolist() == reference["request_id"].tolist(), name
        assert frame["num_prompt_tokens"].tolist() == reference["num_prompt_tokens"].tolist(), name
        assert frame["num_output_tokens"].tolist() == reference["num_output_tokens"].tolist(), name
        assert frame["arrival_time"].to_numpy() == pytest.approx(reference["arrival_time"].to_numpy(), abs=1e-6), name


def test_run_manifest_and_workload(tiny_run, cost_file):
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert len(manifest["git"]["commit"]) == 40
    assert isinstance(manifest["git"]["dirty"], bool)
    assert manifest["packages"]["torch"]
    assert manifest["hardware"]["cpu"]
    assert manifest["torch_threads"] == 2
    assert manifest["seeds"]["root"] == 0
    assert manifest["cost_model_file"] == str(cost_file.resolve())
    assert manifest["command"].startswith("python -m experiments run +workload=poisson")

    workload = json.loads((tiny_run / "workload.json").read_text())
    assert workload["name"] == "poisson"
    assert workload["num_requests"] == 6
    assert any("poisson arrivals" in t for t in workload["transformations"])

    config = (tiny_run / "config.yaml").read_text()
    assert "micro-llama" in config
    assert "${" not in config  # resolved


def test_report_regenerates_summary(tiny_run, tmp_path):
    copy = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, copy)
    before = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").unlink()
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "figures")

    result = run_cli("report", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((copy / "summary.json").read_text()) == before
    assert (copy / "report.html").is_file()
    assert list((copy / "figures").glob("*.png"))


def test_report_rejects_missing_folder(tmp_path):
    result = run_cli("report", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_interrupted_run_renamed_failed(conf_dir, cost_file, tmp_path):
    results = tmp_path / "results"
    overrides = [o for o in tiny(conf_dir, cost_file, results) if not o.startswith("workload.num_requests=")]
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments", "run", "+workload=poisson", "systems=[measured/continuous]",
         "workload.num_requests=3000", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        for line in process.stdout:  # Hydra logs to stdout
            if "stage: measured/continuous" in line:
                break
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)  # keep reading stdout so the child never blocks on a full pipe
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    folders = [p for p in results.glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders
    assert folders[0].name.endswith("-poisson.failed")
    assert not (folders[0] / "summary.json").exists()


# sweeps


def test_multirun_joblib_and_compare(conf_dir, cost_file, tmp_path):
    results = tmp_path / "results"
    overrides = [o for o in tiny(conf_dir, cost_file, results) if not o.startswith("workload.rate=")]
    result = run_cli("run", "-m", "+workload=poisson", "workload.rate=10,40", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2", "systems=[predicted/continuous]", "report=false", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list(results.glob("*/*-sweep"))
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0-poisson", "1-poisson"]
    rates = sorted(json.loads((job / "workload.json").read_text())["source"]["rate"] for job in jobs)
    assert rates == [10.0, 40.0]

    out = tmp_path / "compare"
    result = run_cli("compare", str(sweeps[0]), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(out / "compare.csv")
    assert sorted(table["offered_rate"]) == [10.0, 40.0]
    assert set(table["system"]) == {"predicted/continuous"}
    assert (out / "throughput_latency.png").is_file()
    assert (out / "compare.md").is_file()


def test_compare_rejects_non_run(tmp_path):
    result = run_cli("compare", str(tmp_path))
    assert result.returncode == 2
    assert "summary.json" in result.stderr


# trace replay


def test_azure_trace_replay(conf_dir, cost_file, trace_dir, tmp_path):
    results = tmp_path / "results"
    overrides = [o for o in tiny(conf_dir, cost_file, results) if not o.startswith("workload.")]
    result = run_cli("run", "+workload=azure_conv", "systems=[predicted/continuous]", "report=false",
                     "workload.max_requests=8", "workload.max_prompt_len=128", "workload.max_output_len=16",
                     *overrides, env={"FLASHSERVE_TRACE_DIR": str(trace_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = run_folders(results)
    workload = json.loads((run / "workload.json").read_text())
    assert workload["num_requests"] == 8
    assert workload["transformations"][0].startswith("read ")
    assert any("scaled by 0.25" in t for t in workload["transformations"])
    assert "Splitwise" in workload["source"]["citation"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(manifest["trace"]["trace_sha256"]) == 64


# trained model


def test_stories260k_run(stories260k, cost_file, conf_dir, tmp_path):
    results = tmp_path / "results"
    overrides = [o for o in tiny(conf_dir, cost_file, results) if not o.startswith(("model=", "hydra.searchpath="))]
    result = run_cli("run", "+workload=poisson", "model=stories260k", "systems=[measured/continuous]", "report=false",
                     *overrides, env={"FLASHSERVE_STORIES260K": stories260k})
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = run_folders(results)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run"]["model"] == "stories260k"
    assert summary["systems"]["measured/continuous"]["num_completed"] == 6
    assert f"path: {stories260k}" in (run / "config.yaml").read_text()


# calibration


def test_calibrate_writes_cost_model(conf_dir, tmp_path):
    out = tmp_path / "cost.json"
    result = run_cli("calibrate", f"hydra.searchpath=[file://{conf_dir}]", "model=micro-llama",
                     "engine.max_model_len=256", "sim.calibration_grid=small", f"results_dir={tmp_path}",
                     f"output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    model = FittedCostModel.load(out)
    assert model.metadata["model"] == "micro-llama"
    assert model.metadata["torch_threads"] == 2


# rejected inputs: status 2, a message naming the value and the fix, no run folder


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    wrong_columns = tmp_path / "wrong.csv"
    wrong_columns.write_text("time,prompt,output\n2023-11-16 18:15:46,10,5\n")
    return {
        "no workload": ([], ["+workload=poisson", "poisson", "azure_conv"]),
        "unknown workload": (["+workload=nope"], ["'nope'", "+workload=poisson"]),
        "missing trace": (["+workload=azure_conv", f"workload.trace_path={tmp_path}/missing.csv"],
                          ["missing.csv", "not found", "FLASHSERVE_TRACE_DIR"]),
        "wrong columns": (["+workload=azure_conv", f"workload.trace_path={wrong_columns}"],
                          ["wrong.csv", "ContextTokens"]),
        "negative rate": (["+workload=poisson", "workload.rate=-2"], ["-2", "workload.rate="]),
        "unknown system": (["+workload=poisson", "systems=[measured/nope]"], ["measured/nope", "measured/continuous"]),
    }


@pytest.mark.parametrize("case", ["no workload", "unknown workload", "missing trace", "wrong columns",
                                  "negative rate", "unknown system"])
def test_bad_input_exits_2(case, tmp_path):
    results = tmp_path / "results"
    overrides, expected = bad_inputs(tmp_path)[case]
    result = run_cli("run", *overrides, f"results_dir={results}", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, f"{text!r} not in {result.stderr!r}"
    assert run_folders(results) == []


def test_bad_input_in_sweep_exits_2(tmp_path):
    results = tmp_path / "results"
    result = run_cli("run", "-m", "+workload=poisson", "workload.rate=5,-1", f"results_dir={results}", timeout=120)
    assert result.returncode == 2
    assert "-1" in result.stderr
    assert run_folders(results) == []


# HTTP replay against the project's own server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_replay_against_server(conf_dir, cost_file, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flashserve.cli", "serve", "--model", str(MICRO_LLAMA), "--served-model-name",
         "micro-llama", "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "64", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "server did not start within 60 s"
            time.sleep(0.5)

        results = tmp_path / "results"
        result = run_cli("run", "+workload=poisson", "systems=[measured/http]", "report=false",
                         f"http.base_url=http://127.0.0.1:{port}/v1", *tiny(conf_dir, cost_file, results))
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)

    [run] = run_folders(results)
    summary = json.loads((run / "summary.json").read_text())
    http = summary["systems"]["measured/http"]
    assert http["kind"] == "measured"
    assert http["num_completed"] == 6
    assert http["batching"] is None
