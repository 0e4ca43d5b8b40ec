"""Command line of the simulator: `python -m sim replay ...` and `python -m sim calibrate ...`.

Invalid input (a missing or malformed trace, an unknown model or hardware, a request that
cannot fit) prints one error line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd

from flashserve.config import EngineConfig
from flashserve.core import KV_ALLOCATIONS, BATCHING_POLICIES, SchedulerConfig, StepRecord

logger = logging.getLogger("sim")

EXIT_INVALID_INPUT = 2
WORKLOADS = ("poisson", "gamma", "constant")


class InputError(Exception):
    """Invalid user input: reported as one line, exit status 2."""


# arguments


def build_parser() -> argparse.ArgumentParser:
    engine_defaults = EngineConfig()
    parser = argparse.ArgumentParser(prog="python -m sim", description="Simulate the flashserve engine with SimPy.")
    commands = parser.add_subparsers(dest="command", required=True)

    replay = commands.add_parser("replay", help="simulate a trace or a synthetic workload and summarize it")
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    source.add_argument("--workload", choices=WORKLOADS, help="synthetic arrival process instead of a trace")
    replay.add_argument("--rate", type=float, default=1.0, help="synthetic workload: requests per second (default 1)")
    replay.add_argument("--num-requests", type=int, default=100, help="synthetic workload: number of requests (default 100)")
    replay.add_argument("--prompt-len", type=int, default=128, help="synthetic workload: median prompt tokens, lognormal (default 128)")
    replay.add_argument("--output-len", type=int, default=128, help="synthetic workload: median output tokens, lognormal (default 128)")
    replay.add_argument("--burstiness", type=float, default=1.0, help="gamma workload: shape of the gaps; 1 is Poisson (default 1)")
    replay.add_argument("--seed", type=int, default=0, help="synthetic workload: random seed (default 0)")
    replay.add_argument("--max-requests", type=int, help="trace: keep only the first N requests")
    replay.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply arrival times (0.5 replays twice as fast)")

    replay.add_argument("--batching", choices=BATCHING_POLICIES, default="continuous", help="batching policy (default continuous)")
    replay.add_argument("--kv-allocation", choices=KV_ALLOCATIONS, default="paged", help="KV allocation (default paged)")
    replay.add_argument("--model", default="tiny-llama", help="model config name in conf/model, config file or HF checkpoint dir (default tiny-llama)")
    replay.add_argument("--cost-model", choices=("fitted", "roofline"), default="roofline", help="step-time model (default roofline)")
    replay.add_argument("--cost-file", help="fitted cost model JSON written by `python -m sim calibrate`")
    replay.add_argument("--hardware", default="cpu", help="roofline: hardware name in conf/hardware or a YAML file (default cpu)")
    replay.add_argument("--max-num-seqs", type=int, default=engine_defaults.max_num_seqs, help=f"maximum running requests (default {engine_defaults.max_num_seqs})")
    replay.add_argument("--max-num-batched-tokens", type=int, default=engine_defaults.max_num_batched_tokens, help=f"token budget of one step (default {engine_defaults.max_num_batched_tokens})")
    replay.add_argument("--max-model-len", type=int, help="maximum prompt + output tokens; longer trace requests are clipped (default: the model's max_position_embeddings)")
    replay.add_argument("--block-size", type=int, default=engine_defaults.block_size, help=f"token slots per KV block (default {engine_defaults.block_size})")
    replay.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (default: sized from the hardware memory under roofline, from kv_cache_memory_gb under fitted)")
    replay.add_argument("--out", help="folder for requests.parquet, steps.parquet and summary.json")
    replay.add_argument("-v", "--verbose", action="store_true", help="log progress")

    calibrate = commands.add_parser("calibrate", help="profile the engine and fit the cost model")
    calibrate.add_argument("--model", default="tiny-llama", help="model to profile (default tiny-llama)")
    calibrate.add_argument("--out", required=True, help="output JSON file of the fitted cost model")
    calibrate.add_argument("--threads", type=int, help="torch threads during profiling (default: torch's current setting)")
    calibrate.add_argument("--grid", choices=("default", "small"), default="default", help="profiling grid; small takes seconds (default default)")
    calibrate.add_argument("--device", default=engine_defaults.device, help=f"engine device (default {engine_defaults.device})")
    calibrate.add_argument("--dtype", default=engine_defaults.dtype, help=f"engine dtype (default {engine_defaults.dtype})")
    calibrate.add_argument("--block-size", type=int, default=engine_defaults.block_size, help=f"token slots per KV block (default {engine_defaults.block_size})")
    calibrate.add_argument("--max-num-batched-tokens", type=int, default=engine_defaults.max_num_batched_tokens, help=f"token budget of one step (default {engine_defaults.max_num_batched_tokens})")
    calibrate.add_argument("--num-kv-blocks", type=int, help="KV cache blocks of the profiled engine (default: the engine's sizing)")
    calibrate.add_argument("--hardware", help="label stored with the fit, for example a conf/hardware name")
    calibrate.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "replay":
            return replay(args)
        return calibrate(args)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID_INPUT


# replay


def replay(args: argparse.Namespace) -> int:
    from sim.cost_model import RooflineCostModel, load_cost_model, model_shape

    for option in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be a positive integer, got {value}")

    if args.cost_model == "fitted" and not args.cost_file:
        raise InputError("--cost-model fitted needs --cost-file; create one with `python -m sim calibrate --out PATH`")
    cost_model = load_cost_model(args.cost_model, path=args.cost_file, model=args.model, hardware=args.hardware)
    if isinstance(cost_model, RooflineCostModel):
        dtype = cost_model.hardware.dtype
    else:
        dtype = cost_model.metadata.get("dtype", "float32")
    shape = model_shape(args.model, dtype)
    if args.cost_model == "fitted":
        fitted_model = cost_model.metadata.get("model")
        if fitted_model and fitted_model != shape.name:
            logger.warning("cost file %s was fitted on model %s, not %s", args.cost_file, fitted_model, shape.name)

    max_model_len = shape.max_position_embeddings if args.max_model_len is None else args.max_model_len
    if args.num_kv_blocks is not None:
        num_kv_blocks, kv_source = args.num_kv_blocks, "--num-kv-blocks"
    elif isinstance(cost_model, RooflineCostModel):
        num_kv_blocks = cost_model.kv_cache_blocks(args.block_size)
        kv_source = f"{cost_model.hardware.name} memory x {cost_model.hardware.memory_utilization} minus weights"
    else:
        num_kv_blocks, kv_source = engine_kv_blocks(args.model, dtype, args.block_size)
    scheduler_config = SchedulerConfig(
        num_kv_blocks=num_kv_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        batching=args.batching,
        kv_allocation=args.kv_allocation,
    )
    workload = load_workload(args, max_model_len)

    from sim.simulator import simulate

    cpu_start = time.process_time()
    result = simulate(workload.requests, scheduler_config, cost_model)
    cpu_time = time.process_time() - cpu_start

    system = f"predicted/{args.batching}-{args.kv_allocation}"
    requests, steps = record_frames(result, system)
    from experiments.metrics import summarize

    summary = summarize(requests, steps)
    report = {
        "system": system,
        "is_estimate": result.is_estimate,
        "label": "estimate (roofline)" if result.is_estimate else "prediction (fitted cost model)",
        "cost_model": result.cost_model,
        "cost_model_config": cost_model.to_json(),
        "scheduler_config": asdict(scheduler_config),
        "kv_cache_source": kv_source,
        "workload": {"name": workload.name, "source": workload.source, "transformations": workload.transformations},
        "wall_time_s": result.wall_time_s,
        "cpu_time_s": cpu_time,
        "simulated_time_s": result.simulated_time_s,
        "summary": summary,
    }
    print(format_summary(report))
    if args.out:
        write_outputs(Path(args.out), requests, steps, report)
        print(f"wrote {args.out}/requests.parquet, steps.parquet, summary.json")
    return 0


def engine_kv_blocks(model: str, dtype: str, block_size: int) -> tuple[int, str]:
    """Compute the KV blocks that the engine allocates on the CPU: EngineConfig.kv_cache_memory_gb of KV cache."""
    from sim.cost_model import model_shape

    memory_gb = EngineConfig().kv_cache_memory_gb
    per_block = model_shape(model, dtype).kv_bytes_per_token * block_size
    return int(memory_gb * 2**30 // per_block), f"kv_cache_memory_gb={memory_gb} ({dtype}), as the engine on the CPU"


def load_workload(args: argparse.Namespace, max_model_len: int):
    """Build the trace or synthetic workload, with lengths clipped to max_model_len."""
    from experiments.workloads import LengthDist, azure_trace, synthetic

    if args.trace:
        return azure_trace(
            args.trace, max_requests=args.max_requests, time_scale=args.time_scale, max_model_len=max_model_len,
            name=Path(args.trace).stem,
        )
    for name in ("rate", "num_requests", "prompt_len", "output_len"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    high = max(1, max_model_len - 1)
    return synthetic(
        args.workload, rate=args.rate, num_requests=args.num_requests,
        prompt_len=LengthDist("lognormal", mean=args.prompt_len, sigma=0.6, low=1, high=high),
        output_len=LengthDist("lognormal", mean=args.output_len, sigma=0.6, low=1, high=high),
        seed=args.seed, burstiness=args.burstiness, max_model_len=max_model_len,
    )


# records and summary


STEP_FIELDS = tuple(f.name for f in fields(StepRecord))


def record_frames(result, system: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Request and step tables in the shared metrics layout (experiments.metrics)."""
    from experiments.metrics import requests_frame

    requests = requests_frame(result.request_records, system)
    # NOTE: the step table is built from attribute tuples, with the columns of metrics.steps_frame.
    # That function calls asdict() per record, which takes tens of seconds for the million steps
    # of an hour-long trace.
    getter = operator.attrgetter(*STEP_FIELDS)
    rows = [getter(record) for record in result.step_records]
    steps = pd.DataFrame.from_records(rows, columns=list(STEP_FIELDS))
    steps.insert(0, "system", system)
    return requests, steps


def write_outputs(out: Path, requests: pd.DataFrame, steps: pd.DataFrame, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(out / "requests.parquet", index=False)
    steps.to_parquet(out / "steps.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _seconds(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def format_summary(report: dict) -> str:
    summary = report["summary"]
    config = report["scheduler_config"]
    label = "ESTIMATE" if report["is_estimate"] else "prediction"
    lines = [
        f"{report['system']} [{label}]: {summary.get('num_completed', 0)}/{summary.get('num_requests', 0)} requests "
        f"of workload {report['workload']['name']}",
        f"cost model: {report['cost_model']}",
        f"KV cache: {config['num_kv_blocks']} blocks x {config['block_size']} tokens ({report['kv_cache_source']}); "
        f"max_num_seqs={config['max_num_seqs']} max_num_batched_tokens={config['max_num_batched_tokens']} "
        f"max_model_len={config['max_model_len']}",
    ]
    for note in report["workload"]["transformations"]:
        lines.append(f"workload: {note}")
    if "citation" in report["workload"]["source"]:
        lines.append(f"trace: {report['workload']['source']['citation']}")
    if not summary.get("num_completed"):
        return "\n".join(lines)

    lines.append("")
    lines.append(f"{'latency (s)':<12}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        stats = summary[metric]
        lines.append(f"{metric.upper():<12}" + "".join(f"{_seconds(stats[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    lines.append("")
    lines.append(
        f"throughput: {summary['request_throughput']:.3f} req/s, {summary['output_throughput']:.1f} output tok/s, "
        f"{summary['total_token_throughput']:.1f} total tok/s over {summary['duration_s']:.1f} s"
    )
    lines.append(
        f"KV usage: mean {100 * summary['kv_usage_mean']:.1f}%, peak {100 * summary['kv_usage_peak']:.1f}%; "
        f"fragmentation {100 * summary['kv_fragmentation']:.1f}% (internal {100 * summary['kv_fragmentation_internal']:.1f}%, "
        f"reservation {100 * summary['kv_fragmentation_reservation']:.1f}%)"
    )
    lines.append(f"preemptions: {summary['num_preemptions']}; steps: {summary['num_steps']}; mean batch {summary['batch_size_mean']:.1f}")
    lines.append(
        f"simulation: {report['simulated_time_s']:.1f} s simulated in {report['wall_time_s']:.2f} s wall "
        f"({report['cpu_time_s']:.2f} s CPU)"
    )
    return "\n".join(lines)


# calibrate


def calibrate(args: argparse.Namespace) -> int:
    from sim.profiling import SMALL_GRID, ProfileGrid, calibrate as run_calibration

    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be >= 1, got {args.threads}")
    grid = SMALL_GRID if args.grid == "small" else ProfileGrid()
    cost_model = run_calibration(
        model=args.model, out=args.out, grid=grid, num_threads=args.threads, hardware=args.hardware,
        device=args.device, dtype=args.dtype, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
    )
    meta = cost_model.metadata
    print(f"{cost_model.describe()}: median |relative error| {100 * meta['median_abs_relative_error']:.1f}%, "
          f"R^2 {meta['r2']:.3f}")
    for name, value in cost_model.coefficients.items():
        print(f"  {name:<28}{value:.4g}")
    print(f"wrote {args.out}")
    return 0
