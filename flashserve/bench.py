"""Offline throughput benchmark: continuous vs static batching vs transformers generate().

    python -m flashserve.bench [--trace PATH] [--num-requests 128] [--batch-size 32]

Draws prompt and output lengths from the Azure LLM inference trace 2023 (conversation; Patel
et al., "Splitwise", ISCA 2024, CC-BY 4.0) and scales them to the model's context. Every request
is submitted at once, and the same requests are served by (a) this engine with continuous batching,
(b) this engine with static batching and (c) transformers `model.generate()` in static
batches of the same size. Each system has its own model object with the same seeded weights.
Every system is warmed up, the systems run in turn `--repeats` times, and the median of the
useful output tokens/s (each request's own output length) is reported with the ratios.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashserve import LLM, SamplingParams
from flashserve.baselines.hf_generate import BaselineRequest, run_hf_generate
from flashserve.model import loader

logger = logging.getLogger(__name__)


def default_trace() -> str | None:
    trace_dir = os.environ.get("FLASHSERVE_TRACE_DIR")
    return str(Path(trace_dir) / "AzureLLMInferenceTrace_conv.csv") if trace_dir else None


def draw_lengths(trace: str | None, num_requests: int, max_model_len: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompt and output lengths resampled from the trace, scaled so the 99th percentile of
    prompt + output fits in max_model_len; the rest is clipped."""
    from experiments.workloads import read_azure_trace

    rng = np.random.default_rng(seed)
    if trace is None:
        raise SystemExit("no trace given: pass --trace PATH or set FLASHSERVE_TRACE_DIR to the folder of "
                         "AzureLLMInferenceTrace_conv.csv")
    frame = read_azure_trace(trace)
    rows = frame.iloc[rng.choice(len(frame), size=num_requests, replace=num_requests > len(frame))]
    prompts = rows["ContextTokens"].to_numpy(dtype=float)
    outputs = rows["GeneratedTokens"].to_numpy(dtype=float)
    total = frame["ContextTokens"] + frame["GeneratedTokens"]
    scale = min(1.0, max_model_len / float(np.percentile(total, 99)))
    prompts = np.clip(np.rint(prompts * scale), 1, max_model_len - 1).astype(int)
    outputs = np.clip(np.rint(outputs * scale), 1, None).astype(int)
    outputs = np.minimum(outputs, max_model_len - prompts)
    note = f"{num_requests} requests resampled from {Path(trace).name}, lengths scaled by {scale:.3f}"
    return prompts, outputs, note


def make_prompts(prompt_lens: np.ndarray, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    high = min(vocab_size, 259)
    return [rng.integers(3, high, size=n).tolist() for n in prompt_lens]


def run_engine(llm: LLM, prompts: list[list[int]], outputs: np.ndarray) -> float:
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    if produced != int(outputs.sum()):
        raise RuntimeError(f"engine produced {produced} tokens, expected {int(outputs.sum())}")
    return elapsed


def run_hf(model, prompts: list[list[int]], outputs: np.ndarray, batch_size: int) -> float:
    requests = [BaselineRequest(f"r{i}", 0.0, p, int(n)) for i, (p, n) in enumerate(zip(prompts, outputs))]
    start = time.perf_counter()
    run_hf_generate(model, requests, batch_size)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashserve.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="model name in conf/model, config file or checkpoint dir")
    parser.add_argument("--trace", default=default_trace(), help="Azure trace CSV (default: $FLASHSERVE_TRACE_DIR/AzureLLMInferenceTrace_conv.csv)")
    parser.add_argument("--num-requests", type=int, default=128, help="requests, all submitted at once")
    parser.add_argument("--batch-size", type=int, default=32, help="max_num_seqs of the engine and generate() batch size")
    parser.add_argument("--max-model-len", type=int, default=1024, help="context that the trace lengths are scaled to, in tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, pinned for every system")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system; the median is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled lengths, prompts and weights")
    args = parser.parse_args(argv)
    for name in ("num_requests", "batch_size", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_model_len < 2:
        parser.error(f"--max-model-len must be at least 2 tokens, got {args.max_model_len}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        prompt_lens, output_lens, note = draw_lengths(args.trace, args.num_requests, args.max_model_len, args.seed)
        loader.resolve_model(args.model)
    except ValueError as error:
        parser.error(str(error))
    print(f"workload: {note}; all arrive at once")
    print(f"  prompt tokens: mean {prompt_lens.mean():.0f}, max {prompt_lens.max()}; "
          f"output tokens: mean {output_lens.mean():.0f}, max {output_lens.max()}, total {output_lens.sum()}")

    blocks = args.batch_size * -(-args.max_model_len // 16) + 16
    common = dict(max_num_seqs=args.batch_size, max_model_len=args.max_model_len, num_kv_blocks=blocks,
                  seed=args.seed, load_format="dummy")
    continuous = LLM(args.model, batching="continuous", **common)
    static = LLM(args.model, batching="static", **common)
    source = loader.resolve_model(args.model)
    hf_model, _ = loader.build_model(source, "dummy", torch.float32, torch.device("cpu"), args.seed, "sdpa")
    prompts = make_prompts(prompt_lens, continuous.engine.model.config.vocab_size, args.seed)

    systems = {
        "flashserve continuous": lambda p, o: run_engine(continuous, p, o),
        "flashserve static": lambda p, o: run_engine(static, p, o),
        "hf generate() static": lambda p, o: run_hf(hf_model, p, o, args.batch_size),
    }
    warm = min(8, args.num_requests)
    for name, run in systems.items():
        run(prompts[:warm], np.minimum(output_lens[:warm], 8))

    times: dict[str, list[float]] = {name: [] for name in systems}
    for repeat in range(args.repeats):
        for name, run in systems.items():
            times[name].append(run(prompts, output_lens))
            print(f"  run {repeat + 1}/{args.repeats} {name}: {times[name][-1]:.2f} s", file=sys.stderr)

    total = int(output_lens.sum())
    throughput = {name: total / statistics.median(t) for name, t in times.items()}
    baseline = throughput["hf generate() static"]
    print(f"\nthreads={args.threads} batch_size={args.batch_size} model={args.model} repeats={args.repeats} (median)")
    print(f"{'system':<24}{'median s':>10}{'output tok/s':>14}{'vs generate()':>15}")
    for name, value in throughput.items():
        print(f"{name:<24}{statistics.median(times[name]):>10.2f}{value:>14.1f}{value / baseline:>14.2f}x")
    print(f"continuous / static: {throughput['flashserve continuous'] / throughput['flashserve static']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
