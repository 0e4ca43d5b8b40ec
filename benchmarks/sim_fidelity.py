"""Fidelity of the simulator: the same Poisson workload through the real engine and through the
simulator with a fitted cost model, for continuous and static batching.

The cost model is fitted on a profiling grid (sim.profiling), never on this workload. The
engine replays the workload in real time: each request is added when its arrival time has
passed, the engine steps while it has work and sleeps only when idle. Both systems get the
same lengths and scheduler limits. The script prints the relative error of throughput and of
the mean, p50 and p90 TTFT, TPOT and E2E latency.

    python benchmarks/sim_fidelity.py --threads 1 --out results/sim_fidelity.json
    python benchmarks/sim_fidelity.py --cost-file cost.json   # skip calibration

Run it on an otherwise idle machine: another process that takes the CPU slows the engine, and
not the simulator, so contention shows up as prediction error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from experiments.metrics import prediction_errors, requests_frame, steps_frame, summarize
from experiments.runners import replay_engine, warm_up_engine
from experiments.workloads import LengthDist, prompt_token_ids, synthetic
from flashserve.core import SchedulerConfig
from flashserve.engine import LLMEngine
from sim import load_cost_model, simulate
from sim.profiling import LOSSES, ProfileGrid, calibrate

logger = logging.getLogger("sim_fidelity")

REPORTED = (
    "request_throughput", "output_throughput",
    "ttft_mean", "ttft_p50", "ttft_p90",
    "tpot_mean", "tpot_p50", "tpot_p90",
    "e2e_mean", "e2e_p50", "e2e_p90",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="model config name or path (default tiny-llama)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for profiling and replay (default 1)")
    parser.add_argument("--cost-file", help="use this fitted cost model instead of calibrating")
    parser.add_argument("--save-cost-file", help="write the fitted cost model here")
    parser.add_argument("--loss", choices=LOSSES, default="soft_l1", help="loss of the cost-model fit (default soft_l1)")
    parser.add_argument("--num-requests", type=int, default=150, help="requests in the workload (default 150)")
    parser.add_argument("--rate", type=float, default=3.0, help="Poisson arrival rate, requests/s (default 3)")
    parser.add_argument("--prompt-len", type=int, default=128, help="median prompt tokens, lognormal (default 128)")
    parser.add_argument("--output-len", type=int, default=64, help="median output tokens, lognormal (default 64)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--batching", nargs="+", default=["continuous", "static"], help="batching policies to compare")
    parser.add_argument("--kv-allocation", default="paged", help="KV allocation of both systems (default paged)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="maximum running requests (default 32)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step (default 2048)")
    parser.add_argument("--out", help="JSON file for the summaries and errors")
    return parser.parse_args(argv)


def make_workload(args):
    return synthetic(
        "poisson", args.rate, args.num_requests,
        LengthDist("lognormal", mean=args.prompt_len, sigma=0.6, low=8, high=4 * args.prompt_len),
        LengthDist("lognormal", mean=args.output_len, sigma=0.6, low=4, high=4 * args.output_len),
        seed=args.seed, name="poisson",
    )


def measure(args, batching: str, workload) -> tuple[dict, SchedulerConfig, float]:
    """Replay the workload through a fresh engine in real time.

    Returns the summary, the scheduler limits and the CPU share while stepping: process CPU
    seconds / seconds spent in steps. Below about 0.95 another process took the CPU.
    """
    engine = LLMEngine(
        model=args.model, device="cpu", batching=batching, kv_allocation=args.kv_allocation,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
    )
    warm_up_engine(engine, 8)
    vocab = engine.model.config.vocab_size
    prompt_ids = {spec.request_id: prompt_token_ids(spec, vocab) for spec in workload.requests}
    cpu_start = time.process_time()
    requests, steps = replay_engine(engine, workload.requests, prompt_ids)
    cpu_share = (time.process_time() - cpu_start) / sum(step.duration for step in steps)
    summary = summarize(requests_frame(requests, "measured"), steps_frame(steps, "measured"))
    return summary, engine.scheduler.config, cpu_share


def predict(scheduler_config: SchedulerConfig, workload, cost_model) -> dict:
    result = simulate(workload.requests, scheduler_config, cost_model)
    return summarize(requests_frame(result.request_records, "predicted"), steps_frame(result.step_records, "predicted"))


def format_row(name: str, measured: dict, predicted: dict, error: float | None) -> str:
    def value(summary):
        metric, _, stat = name.rpartition("_") if name not in ("request_throughput", "output_throughput") else (name, "", "")
        number = summary[metric] if not stat else summary[metric][stat]
        return f"{number:12.4f}"

    shown = "-" if error is None else f"{100 * error:+8.1f}%"
    return f"{name:<20}{value(measured)}{value(predicted)}{shown:>10}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    if args.cost_file:
        cost_model = load_cost_model("fitted", path=args.cost_file)
    else:
        cost_model = calibrate(model=args.model, out=args.save_cost_file, grid=ProfileGrid(), num_threads=args.threads,
                               loss=args.loss, device="cpu", max_num_batched_tokens=args.max_num_batched_tokens)
    print(f"cost model: {cost_model.describe()}")

    workload = make_workload(args)
    results = {}
    for batching in args.batching:
        start = time.perf_counter()
        measured, scheduler_config, cpu_share = measure(args, batching, workload)
        logger.info("measured %s batching in %.1f s", batching, time.perf_counter() - start)
        predicted = predict(scheduler_config, workload, cost_model)
        errors = prediction_errors(predicted, measured)
        results[batching] = {"measured": measured, "predicted": predicted, "errors": errors, "cpu_share": cpu_share}

        print(f"\n{batching} batching, {args.kv_allocation} KV, {args.num_requests} requests at {args.rate} req/s; "
              f"engine CPU share while stepping {cpu_share:.2f}")
        print(f"{'metric':<20}{'measured':>12}{'predicted':>12}{'error':>10}")
        for name in REPORTED:
            print(format_row(name, measured, predicted, errors[name]))
        worst = max(abs(errors[name]) for name in REPORTED if errors[name] is not None)
        print(f"largest |error|: {100 * worst:.1f}%")

    load_after = os.getloadavg()
    print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs; "
          f"torch threads {args.threads}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {
            "arguments": vars(args),
            "cost_model": cost_model.to_json(),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": results,
        }
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
