"""`python -m sim`: replay of an Azure trace slice, synthetic workloads, calibration and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import EXIT_INVALID_INPUT, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv_slice(tmp_path_factory) -> Path:
    """The first 150 requests of the Azure 2023 conversation trace (Patel et al., Splitwise, ISCA 2024; CC-BY 4.0)."""
    trace_dir = os.environ.get("FLASHSERVE_TRACE_DIR")
    if not trace_dir:
        pytest.skip("FLASHSERVE_TRACE_DIR is not set; point it at the folder of AzureLLMInferenceTrace_*.csv")
    source = Path(trace_dir) / "AzureLLMInferenceTrace_conv.csv"
    if not source.is_file():
        pytest.skip(f"FLASHSERVE_TRACE_DIR={trace_dir} has no AzureLLMInferenceTrace_conv.csv")
    path = tmp_path_factory.mktemp("trace") / "conv_slice.csv"
    with open(source) as handle:
        path.write_text("".join(line for _, line in zip(range(151), handle)))
    return path


def test_replay_trace_slice_writes_records(conv_slice, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["replay", "--trace", str(conv_slice), "--model", "llama-3.2-1b", "--hardware", "a100",
                   "--max-model-len", "16384", "--out", str(out)])
    printed = capsys.readouterr().out

    assert status == 0
    assert "ESTIMATE" in printed
    assert "Splitwise" in printed
    for metric in ("TTFT", "TPOT", "E2E", "throughput", "fragmentation", "preemptions", "wall"):
        assert metric in printed, metric

    requests = pd.read_parquet(out / "requests.parquet")
    steps = pd.read_parquet(out / "steps.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert len(requests) == 150
    assert (requests["finish_reason"] == "length").all()
    assert {"ttft", "tpot", "e2e", "token_times"} <= set(requests.columns)
    assert len(steps) == summary["summary"]["num_steps"]
    assert summary["is_estimate"] is True
    assert summary["system"] == "predicted/continuous-paged"
    assert summary["summary"]["num_completed"] == 150
    assert "Splitwise" in summary["workload"]["source"]["citation"]


def test_replay_fitted_static_contiguous(conv_slice, tmp_path, capsys):
    cost_file = tmp_path / "cost.json"
    cost_file.write_text(json.dumps({"kind": "fitted", "coefficients": {"intercept": 0.004, "num_prefill_tokens": 1e-4,
                                                                        "num_decode_seqs": 2e-4},
                                     "metadata": {"model": "tiny-llama", "dtype": "float32"}}))
    status = main(["replay", "--trace", str(conv_slice), "--cost-model", "fitted", "--cost-file", str(cost_file),
                   "--batching", "static", "--kv-allocation", "contiguous", "--max-num-seqs", "8"])
    printed = capsys.readouterr().out

    assert status == 0
    assert "predicted/static-contiguous [prediction]" in printed
    assert "clipped to prompt + output <= 2048" in printed  # tiny-llama's max_position_embeddings


def test_replay_synthetic_workload(capsys):
    status = main(["replay", "--workload", "poisson", "--rate", "5", "--num-requests", "30", "--hardware", "h100",
                   "--model", "smollm2-135m"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "30/30 requests" in printed


@pytest.mark.parametrize("arguments,message", [
    (["--trace", "{missing}"], "not found"),
    (["--trace", "{wrong_columns}"], "lacks columns"),
    (["--trace", "{trace}", "--hardware", "tpu-v9"], "unknown hardware"),
    (["--trace", "{trace}", "--model", "no-such-model"], "no-such-model"),
    (["--trace", "{trace}", "--cost-model", "fitted"], "needs --cost-file"),
    (["--trace", "{trace}", "--num-kv-blocks", "2"], "KV blocks"),
    (["--workload", "poisson", "--rate", "0"], "--rate must be > 0"),
])
def test_bad_input_exits_with_status_2(arguments, message, tmp_path, capsys):
    trace = tmp_path / "ok.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("time,prompt,output\n0,1,2\n")
    paths = {"missing": tmp_path / "missing.csv", "wrong_columns": wrong, "trace": trace}
    arguments = [a.format(**paths) for a in arguments]

    status = main(["replay", *arguments])
    assert status == EXIT_INVALID_INPUT
    assert message in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "sim", "replay", "--trace", str(tmp_path / "missing.csv")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: trace file")


def test_calibrate_command_writes_cost_file(tmp_path, capsys):
    out = tmp_path / "cost.json"
    status = main(["calibrate", "--model", "tiny-llama", "--out", str(out), "--grid", "small", "--threads", "1",
                   "--device", "cpu"])
    assert status == 0
    assert out.is_file()
    data = json.loads(out.read_text())
    assert data["kind"] == "fitted"
    assert data["metadata"]["model"] == "tiny-llama"
    assert "intercept" in capsys.readouterr().out
