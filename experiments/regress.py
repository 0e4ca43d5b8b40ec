"""Performance regression check: `python -m experiments regress`.

Runs a small fixed-seed benchmark set and compares it with the baseline committed in
`results/baselines/regress.json`. Every metric is a ratio or an error measured within this one
run, never an absolute time, because the machines are shared and noisy:

- engine throughput: continuous / HF generate(), static / HF generate() and continuous /
  static, on one fixed request set that arrives at once (medians of repeated runs);
- simulator fidelity: relative errors of the fitted simulator against the engine on one
  Poisson run (throughput, mean TTFT, TPOT, E2E latency);
- simulator speed: simulated requests per wall second divided by the iterations per second of
  a fixed pure-Python reference loop timed in the same process;
- greedy equality of the engine with transformers generate().

It prints a table (metric, baseline, now, tolerance, verdict), writes it as JSON and Markdown,
and exits with status 1 naming each regressed metric. `--update-baseline` rewrites the
baseline from this run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

BASELINE_PATH = Path(__file__).resolve().parents[1] / "results" / "baselines" / "regress.json"


@dataclass
class RegressConfig:
    """Sizes of the benchmark set; the defaults finish in about 3 minutes on a 2-core CPU."""

    model: str = "tiny-llama"
    threads: int = 1  # torch intra-op threads; one thread keeps ratios stable on shared machines
    seed: int = 0
    # engine throughput
    num_requests: int = 64
    batch_size: int = 16
    max_model_len: int = 512
    repeats: int = 3
    # simulator fidelity
    profile_grid: str = "default"  # "default" or "small": the calibration grid of sim.profiling
    poisson_requests: int = 60
    poisson_rate: float = 6.0  # requests/s
    # simulator speed
    speed_requests: int = 3000
    # greedy equality
    greedy_prompts: int = 6
    greedy_tokens: int = 16


@dataclass
class Metric:
    """One measured value and how it is judged against its baseline.

    direction "higher": a regression is now < baseline * (1 - tolerance).
    direction "lower": values are relative errors; a regression is |now| > |baseline| + tolerance.
    direction "equal": a regression is now != baseline.
    """

    name: str
    value: float
    direction: str
    tolerance: float
    description: str


# measurements

def _reference_loop_rate(iterations: int = 2_000_000) -> float:
    """Iterations per second of a fixed pure-Python loop: the yardstick of simulator speed."""
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(iterations):
            total += i & 7
        best = max(best, iterations / (time.perf_counter() - start))
    return best


def measure_engine_throughput(cfg: RegressConfig) -> dict[str, float]:
    """Output tokens/s ratios of continuous, static and generate() on one request set."""
    from flashserve import LLM
    from flashserve.bench import make_prompts, run_engine, run_hf
    from flashserve.model import loader

    rng = np.random.default_rng(cfg.seed)
    prompt_lens = np.clip(rng.lognormal(np.log(120), 0.8, cfg.num_requests), 4, cfg.max_model_len // 2).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(40), 0.9, cfg.num_requests), 2, cfg.max_model_len // 2).astype(int)

    blocks = cfg.batch_size * -(-cfg.max_model_len // 16) + 16
    common = dict(max_num_seqs=cfg.batch_size, max_model_len=cfg.max_model_len, num_kv_blocks=blocks,
                  seed=cfg.seed, load_format="dummy")
    continuous = LLM(cfg.model, batching="continuous", **common)
    static = LLM(cfg.model, batching="static", **common)
    hf_model, _ = loader.build_model(loader.resolve_model(cfg.model), "dummy", torch.float32,
                                     torch.device("cpu"), cfg.seed, "sdpa")
    prompts = make_prompts(prompt_lens, continuous.engine.model.config.vocab_size, cfg.seed)
    systems = {
        "continuous": lambda p, o: run_engine(continuous, p, o),
        "static": lambda p, o: run_engine(static, p, o),
        "hf": lambda p, o: run_hf(hf_model, p, o, cfg.batch_size),
    }
    for run in systems.values():
        run(prompts[:4], np.minimum(output_lens[:4], 4))
    times = {name: [] for name in systems}
    for _ in range(cfg.repeats):
        for name, run in systems.items():
            times[name].append(run(prompts, output_lens))
    median = {name: statistics.median(t) for name, t in times.items()}
    logger.info("engine medians (s): %s", {k: round(v, 3) for k, v in median.items()})
    return {
        "continuous_vs_hf": median["hf"] / median["continuous"],
        "static_vs_hf": median["hf"] / median["static"],
        "continuous_vs_static": median["static"] / median["continuous"],
    }


def measure_sim_fidelity(cfg: RegressConfig, work_dir: Path, cost_model=None) -> dict[str, float]:
    """Relative errors of the fitted simulator against the engine on one Poisson run (continuous, paged)."""
    from experiments import metrics
    from experiments.runners import replay_engine, warm_up_engine
    from experiments.workloads import LengthDist, prompt_token_ids, synthetic
    from flashserve import LLMEngine
    from flashserve.core import SchedulerConfig
    from sim import simulate
    from sim.profiling import SMALL_GRID, ProfileGrid, calibrate

    engine = LLMEngine(model=cfg.model, max_num_seqs=cfg.batch_size, max_model_len=cfg.max_model_len,
                       num_kv_blocks=cfg.batch_size * -(-cfg.max_model_len // 16), seed=cfg.seed,
                       load_format="dummy")
    if cost_model is None:
        grid = SMALL_GRID if cfg.profile_grid == "small" else ProfileGrid()
        cost_model = calibrate(cfg.model, out=work_dir / "cost_model.json", grid=grid, num_threads=cfg.threads,
                               max_num_seqs=cfg.batch_size, max_model_len=cfg.max_model_len,
                               load_format="dummy", seed=cfg.seed)

    workload = synthetic(
        "poisson", cfg.poisson_rate, cfg.poisson_requests,
        LengthDist("lognormal", mean=100, sigma=0.7, low=4, high=cfg.max_model_len // 2),
        LengthDist("lognormal", mean=40, sigma=0.7, low=2, high=cfg.max_model_len // 2),
        seed=cfg.seed,
    )
    vocab = engine.model.config.vocab_size
    prompt_ids = {spec.request_id: prompt_token_ids(spec, vocab, cfg.seed) for spec in workload.requests}
    warm_up_engine(engine, 4)
    measured_requests, measured_steps = replay_engine(engine, workload.requests, prompt_ids)
    scheduler_config = engine.scheduler.config
    predicted = simulate(workload.requests, SchedulerConfig(**asdict(scheduler_config)), cost_model)

    measured = metrics.summarize(metrics.requests_frame(measured_requests, "measured"),
                                 metrics.steps_frame(measured_steps, "measured"))
    simulated = metrics.summarize(metrics.requests_frame(predicted.request_records, "predicted"),
                                  metrics.steps_frame(predicted.step_records, "predicted"))
    errors = metrics.prediction_errors(simulated, measured)
    return {f"sim_error_{key}": errors[key] for key in ("output_throughput", "ttft_mean", "tpot_mean", "e2e_mean")}


def measure_sim_speed(cfg: RegressConfig) -> dict[str, float]:
    """Simulated requests per wall second, relative to the reference loop (higher is faster)."""
    from experiments.workloads import LengthDist, synthetic
    from flashserve.core import SchedulerConfig
    from sim import RooflineCostModel, load_hardware, simulate
    from sim.cost_model import model_shape

    workload = synthetic("poisson", 20.0, cfg.speed_requests, LengthDist("lognormal", mean=400, sigma=0.8, high=2000),
                         LengthDist("lognormal", mean=150, sigma=0.8, high=1000), seed=cfg.seed)
    cost_model = RooflineCostModel(model_shape("llama-3.2-1b"), load_hardware("a100"))
    scheduler_config = SchedulerConfig(num_kv_blocks=8192, block_size=16, max_num_seqs=128,
                                       max_num_batched_tokens=4096, max_model_len=4096)
    reference = _reference_loop_rate()
    result = simulate(workload.requests, scheduler_config, cost_model)
    rate = cfg.speed_requests / result.wall_time_s
    logger.info("simulator: %.0f requests/s of wall time; reference loop %.3g it/s", rate, reference)
    return {"sim_speed_vs_reference": rate / reference * 1e6}


def measure_greedy_equality(cfg: RegressConfig) -> dict[str, float]:
    """1.0 when the engine's greedy tokens equal transformers generate() on every prompt."""
    from flashserve import LLM, SamplingParams
    from flashserve.model import loader

    llm = LLM(cfg.model, num_kv_blocks=256, max_num_batched_tokens=64, seed=cfg.seed, load_format="dummy")
    hf_model, _ = loader.build_model(loader.resolve_model(cfg.model), "dummy", torch.float32,
                                     torch.device("cpu"), cfg.seed, "sdpa")
    rng = np.random.default_rng(cfg.seed)
    prompts = [rng.integers(3, 259, size=int(n)).tolist() for n in rng.integers(3, 200, size=cfg.greedy_prompts)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=cfg.greedy_tokens, ignore_eos=True))
    equal = True
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt])
        reference = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=cfg.greedy_tokens, min_new_tokens=cfg.greedy_tokens,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        equal &= reference == output.outputs[0].token_ids
    return {"greedy_equal": 1.0 if equal else 0.0}


TOLERANCES = {
    # name: (direction, tolerance, description)
    "continuous_vs_hf": ("higher", 0.30, "output tok/s, continuous batching / HF generate()"),
    "static_vs_hf": ("higher", 0.30, "output tok/s, static batching / HF generate()"),
    "continuous_vs_static": ("higher", 0.25, "output tok/s, continuous / static batching"),
    "sim_error_output_throughput": ("lower", 0.10, "simulator vs engine, output throughput (relative error)"),
    "sim_error_ttft_mean": ("lower", 0.30, "simulator vs engine, mean TTFT (relative error)"),
    "sim_error_tpot_mean": ("lower", 0.20, "simulator vs engine, mean TPOT (relative error)"),
    "sim_error_e2e_mean": ("lower", 0.20, "simulator vs engine, mean E2E latency (relative error)"),
    "sim_speed_vs_reference": ("higher", 0.50, "simulated requests per wall second per million reference-loop iterations/s"),
    "greedy_equal": ("equal", 0.0, "greedy tokens equal transformers generate() (1 = yes)"),
}


def collect(cfg: RegressConfig, work_dir: Path) -> list[Metric]:
    """Run every stage and return the metrics in TOLERANCES order."""
    torch.set_num_threads(cfg.threads)
    values: dict[str, float] = {}
    stages = [
        ("greedy equality", lambda: measure_greedy_equality(cfg)),
        ("engine throughput", lambda: measure_engine_throughput(cfg)),
        ("simulator fidelity", lambda: measure_sim_fidelity(cfg, work_dir)),
        ("simulator speed", lambda: measure_sim_speed(cfg)),
    ]
    for label, stage in stages:
        start = time.perf_counter()
        logger.info("regress: %s", label)
        values.update(stage())
        logger.info("regress: %s done in %.1f s", label, time.perf_counter() - start)
    return [Metric(name, float(values[name]), *TOLERANCES[name]) for name in TOLERANCES]


# comparison

def verdict(metric: Metric, baseline: float | None) -> str:
    if baseline is None:
        return "new"
    if metric.direction == "higher":
        return "ok" if metric.value >= baseline * (1 - metric.tolerance) else "REGRESSED"
    if metric.direction == "lower":
        return "ok" if abs(metric.value) <= abs(baseline) + metric.tolerance else "REGRESSED"
    return "ok" if metric.value == baseline else "REGRESSED"


def compare(metrics_now: list[Metric], baseline: dict) -> list[dict]:
    rows = []
    for metric in metrics_now:
        base = baseline.get("metrics", {}).get(metric.name, {}).get("value")
        rows.append({
            "metric": metric.name,
            "baseline": base,
            "now": metric.value,
            "tolerance": metric.tolerance,
            "direction": metric.direction,
            "verdict": verdict(metric, base),
            "description": metric.description,
        })
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _tolerance_text(row: dict) -> str:
    if row["direction"] == "higher":
        return f">= -{row['tolerance']:.0%}"
    if row["direction"] == "lower":
        return f"|err| <= |base| + {row['tolerance']:.2f}"
    return "equal"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| metric | baseline | now | tolerance | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['metric']} | {_fmt(row['baseline'])} | {_fmt(row['now'])} | "
                     f"{_tolerance_text(row)} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    print(f"{'metric':<30}{'baseline':>12}{'now':>12}  {'tolerance':<26}{'verdict'}")
    for row in rows:
        print(f"{row['metric']:<30}{_fmt(row['baseline']):>12}{_fmt(row['now']):>12}  "
              f"{_tolerance_text(row):<26}{row['verdict']}")


def main(argv: list[str] | None = None, config: RegressConfig | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments regress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=BASELINE_PATH, help="baseline JSON to compare with")
    parser.add_argument("--out", type=Path, default=Path("results/regress"), help="folder for regress.json and regress.md")
    parser.add_argument("--update-baseline", action="store_true", help="write this run's values as the new baseline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = config or RegressConfig()
    if not args.update_baseline and not args.baseline.is_file():
        print(f"error: baseline {args.baseline} not found; create it with --update-baseline", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    measured = collect(cfg, args.out)
    elapsed = time.perf_counter() - start

    if args.update_baseline:
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": asdict(cfg), "metrics": {m.name: asdict(m) for m in measured}}
        args.baseline.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"baseline written to {args.baseline}")

    if not args.baseline.is_file():
        print(f"error: baseline {args.baseline} not found; create it with --update-baseline", file=sys.stderr)
        return 2
    baseline = json.loads(args.baseline.read_text())
    rows = compare(measured, baseline)
    print_table(rows)
    (args.out / "regress.json").write_text(json.dumps({"elapsed_s": elapsed, "rows": rows}, indent=2) + "\n")
    (args.out / "regress.md").write_text(markdown_table(rows))
    print(f"regress finished in {elapsed:.0f} s; table in {args.out / 'regress.md'}")

    regressed = [row["metric"] for row in rows if row["verdict"] == "REGRESSED"]
    if regressed:
        print(f"REGRESSION in {', '.join(regressed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
