"""The `flashserve` command: flags map onto EngineConfig, `serve` runs a real server process that
logs its start and stop, `dashboard` launches the Streamlit app with the given settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flashserve.cli import build_parser, dashboard_command, engine_config


def test_serve_flags_map_to_engine_config():
    args = build_parser().parse_args([
        "serve", "--model", "some-model", "--block-size", "8", "--num-kv-blocks", "40", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "256", "--max-model-len", "96", "--batching", "static",
        "--kv-allocation", "contiguous", "--device", "cpu", "--dtype", "float32", "--seed", "5",
        "--load-format", "dummy", "--served-model-name", "a", "b",
    ])
    config = engine_config(args)
    assert (config.model, config.block_size, config.num_kv_blocks, config.max_num_seqs) == ("some-model", 8, 40, 4)
    assert (config.max_num_batched_tokens, config.max_model_len, config.batching) == (256, 96, "static")
    assert (config.kv_allocation, config.device, config.dtype, config.seed) == ("contiguous", "cpu", "float32", 5)
    assert config.load_format == "dummy"
    assert args.served_model_name == ["a", "b"]
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_unset_flags_keep_engine_defaults():
    config = engine_config(build_parser().parse_args(["serve"]))
    assert config.model == "tiny-llama"
    assert config.num_kv_blocks is None
    assert config.block_size == 16
    assert config.batching == "continuous"


def test_dashboard_command_runs_streamlit_app():
    args = build_parser().parse_args(["dashboard", "--server", "http://127.0.0.1:9001", "--results", "out/",
                                      "--port", "8600"])
    command = dashboard_command(args)
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(command[4]).name == "app.py"
    assert Path(command[4]).parent.name == "dashboard"
    assert command[5:] == ["--server.port", "8600", "--server.address", "127.0.0.1", "--server.headless", "true",
                           "--browser.gatherUsageStats", "false",
                           "--", "--server", "http://127.0.0.1:9001", "--results", "out/"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_process_starts_answers_and_stops(micro_llama, tmp_path):
    executable = shutil.which("flashserve")
    if executable is None:
        pytest.skip("the flashserve entry point is not installed; run pip install -e .")

    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [executable, "serve", "--model", micro_llama, "--port", str(port), "--num-kv-blocks", "32",
             "--max-model-len", "64", "--served-model-name", "cli-micro"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
            time.sleep(0.2)

        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                              json={"model": "cli-micro", "prompt": "hi", "max_tokens": 2})
        assert response.status_code == 200
        rejected = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                              json={"model": "cli-micro", "prompt": "hi", "max_tokens": 100})
        assert rejected.status_code == 400
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    text = log.read_text()
    assert process.returncode == 0, text
    assert "server started: model=micro-llama" in text
    assert "kv_blocks=32 x 16 tokens" in text
    assert "device=cpu" in text
    assert "rejected /v1/completions with 400" in text
    assert "server stopped" in text


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_rejects_invalid_port(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--port", port])
    assert exit_info.value.code == 2
    assert "port" in capsys.readouterr().err
