"""Serving throughput over HTTP against the offline engine, on the same requests.

    python benchmarks/http_vs_offline.py [--model tiny-llama] [--batch-size 32] [--num-requests 128]
        [--trace PATH | --prompt-len 32 --output-len 64] [--threads 1] [--repeats 3]

The workload is the offline benchmark's (`python -m flashserve.bench`): with a trace (`--trace`,
default $FLASHSERVE_TRACE_DIR/AzureLLMInferenceTrace_conv.csv) the prompt and output lengths are
drawn from it as flashserve.bench draws them, otherwise every request has `--prompt-len` and
`--output-len` tokens. Both systems serve the same token-id prompts with greedy decoding and
`ignore_eos`, so every request produces exactly its output length. The offline run submits every request at once
to `LLM.generate()` with `max_num_seqs = --batch-size`. The HTTP run starts `flashserve serve`
with the same engine options in a subprocess and replays the requests with
experiments.http_client (all due at t=0, at most `--batch-size` in flight), so the client runs in
this process beside the server. Torch uses `--threads` intra-op threads in both. Each system is
warmed up, the two run in turn `--repeats` times, and the median output tokens/s is reported.

Beside throughput, the script prints the CPU time per output token of the offline process, the
server process and the client (Linux /proc only), which other load on a shared machine does not
inflate the way it inflates wall-clock throughput.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from experiments.http_client import default_prompt_token_ids, replay_http_sync
from flashserve import LLM, SamplingParams


@dataclass
class Spec:
    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int


def make_specs(args: argparse.Namespace) -> tuple[list[Spec], str]:
    """Build the measured requests, all due at t=0, and a line describing them."""
    if args.trace:
        from flashserve.bench import draw_lengths

        prompt_lens, output_lens, note = draw_lengths(args.trace, args.num_requests, args.max_model_len, args.seed)
    else:
        prompt_lens = [args.prompt_len] * args.num_requests
        output_lens = [args.output_len] * args.num_requests
        note = f"{args.num_requests} requests of {args.prompt_len} prompt and {args.output_len} output tokens"
    specs = [Spec(f"r{i}", 0.0, int(p), int(o)) for i, (p, o) in enumerate(zip(prompt_lens, output_lens))]
    return specs, note


def engine_options(args: argparse.Namespace, specs: list[Spec]) -> dict:
    """Build the options of both engines, with a KV cache that fits --batch-size of the longest requests."""
    longest = max(spec.prompt_len + spec.output_len for spec in specs)
    return {
        "max_num_seqs": args.batch_size,
        "num_kv_blocks": -(-longest // args.block_size) * args.batch_size + 16,
        "block_size": args.block_size,
        "max_model_len": args.max_model_len if args.trace else longest,
        "seed": args.seed,
    }


@dataclass
class Result:
    tokens_per_s: float  # output tokens per second of wall-clock time
    cpu_ms_per_token: float  # CPU time of the serving process per output token
    client_cpu_ms_per_token: float | None = None  # HTTP only: CPU time of the client


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_offline(llm: LLM, specs: list[Spec], seed: int) -> Result:
    """Serve `specs` in one generate() call."""
    prompts = [default_prompt_token_ids(spec, seed) for spec in specs]
    params = [SamplingParams(temperature=0, max_tokens=spec.output_len, ignore_eos=True) for spec in specs]
    cpu_start = time.process_time()
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start

    produced = sum(len(result.outputs[0].token_ids) for result in results)
    expected = sum(spec.output_len for spec in specs)
    if produced != expected:
        raise RuntimeError(f"the offline engine produced {produced} tokens, expected {expected}")
    return Result(produced / elapsed, 1000 * cpu / produced)


def run_http(url: str, server_pid: int, specs: list[Spec], args: argparse.Namespace) -> Result:
    """Replay `specs` over HTTP, all due at once, at most --batch-size in flight."""
    server_cpu_start = process_cpu_seconds(server_pid)
    client_cpu_start = time.process_time()
    records = replay_http_sync(url, "bench", specs, timeout_s=600, max_concurrency=args.batch_size, seed=args.seed)
    client_cpu = time.process_time() - client_cpu_start
    server_cpu = process_cpu_seconds(server_pid) - server_cpu_start

    if records.num_errors:
        errors = [record.error for record in records if record.error]
        raise RuntimeError(f"{records.num_errors} HTTP requests failed, first: {errors[0]}")
    produced = sum(record.num_output_tokens for record in records)
    expected = sum(spec.output_len for spec in specs)
    if produced != expected:
        raise RuntimeError(f"the server produced {produced} tokens, expected {expected}")
    return Result(produced / (records.end_time - records.start_time), 1000 * server_cpu / produced,
                  1000 * client_cpu / produced)


def start_server(args: argparse.Namespace, options: dict, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "flashserve.cli", "serve", "--model", args.model, "--port", str(port),
        "--served-model-name", "bench", "--log-level", "warning",
    ]
    for name, value in options.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server did not start on port {port}")
        time.sleep(0.2)


def default_trace() -> str | None:
    trace_dir = os.environ.get("FLASHSERVE_TRACE_DIR")
    return str(Path(trace_dir) / "AzureLLMInferenceTrace_conv.csv") if trace_dir else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="model name or checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=32, help="max_num_seqs of both engines, and HTTP concurrency")
    parser.add_argument("--num-requests", type=int, default=128, help="measured requests per run")
    parser.add_argument("--trace", default=default_trace(), help="Azure trace CSV to draw lengths from "
                        "(default: $FLASHSERVE_TRACE_DIR/AzureLLMInferenceTrace_conv.csv); '' for fixed lengths")
    parser.add_argument("--max-model-len", type=int, default=1024, help="context the trace lengths are scaled to")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request, without a trace")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request, without a trace")
    parser.add_argument("--block-size", type=int, default=16, help="token slots per KV block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    specs, note = make_specs(args)
    warmup = [Spec(f"w{i}", 0.0, spec.prompt_len, 8) for i, spec in enumerate(specs[:args.batch_size])]
    options = engine_options(args, specs)
    print(f"workload: {note}; all due at once", flush=True)

    llm = LLM(args.model, **options)
    run_offline(llm, warmup, args.seed)
    port = free_port()
    server = start_server(args, options, port)
    url = f"http://127.0.0.1:{port}"
    offline: list[Result] = []
    http: list[Result] = []
    try:
        run_http(url, server.pid, warmup, args)
        for repeat in range(args.repeats):
            offline.append(run_offline(llm, specs, args.seed))
            http.append(run_http(url, server.pid, specs, args))
            print(f"run {repeat + 1}: offline {offline[-1].tokens_per_s:.0f} tok/s, "
                  f"HTTP {http[-1].tokens_per_s:.0f} tok/s, load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    def median(results: list[Result], name: str) -> float:
        return statistics.median(getattr(result, name) for result in results)

    offline_rate = median(offline, "tokens_per_s")
    http_rate = median(http, "tokens_per_s")
    print(f"model={Path(args.model).name} batch_size={args.batch_size} requests={len(specs)} "
          f"output_tokens={sum(spec.output_len for spec in specs)} threads={args.threads} "
          f"repeats={args.repeats} cpus={os.cpu_count()}")
    print(f"offline LLM.generate: {offline_rate:.0f} output tok/s, "
          f"{median(offline, 'cpu_ms_per_token'):.3f} CPU ms/token (medians)")
    print(f"HTTP /v1/completions: {http_rate:.0f} output tok/s, server {median(http, 'cpu_ms_per_token'):.3f} "
          f"CPU ms/token, client {median(http, 'client_cpu_ms_per_token'):.3f} CPU ms/token (medians)")
    print(f"HTTP / offline throughput: {http_rate / offline_rate:.1%}")


if __name__ == "__main__":
    main()
