"""Calibration of the fitted cost model: profile the real engine over a grid of batch shapes,
then fit step time as a non-negative linear function of the step's shape.

Each grid cell adds requests of chosen lengths to an idle engine and steps it until they
finish, so the cell sets every step's shape. A prefill cell is one step of N prompts of L
tokens. A decode cell is N sequences decoding at context L (equal or spread lengths). A mixed
cell is N decoding sequences that one new prompt joins.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path

import numpy as np

from flashserve.core import StepRecord
from sim.cost_model import FEATURES, FittedCostModel, StepShape, feature_value, step_shape

logger = logging.getLogger(__name__)

FIT_TARGETS = ("elapsed", "duration")
PROMPT_TOKEN = 3  # first id after the usual specials 0-2; the engine's cost does not depend on ids


@dataclass
class ProfileGrid:
    """Batch shapes to profile. Lengths are in tokens. A cell whose lengths exceed the engine's
    max_model_len, or that prefills more than `max_cell_tokens`, is skipped."""

    prefill_lengths: tuple[int, ...] = (16, 64, 256, 1024)  # prompt lengths of prefill cells
    prefill_batch_sizes: tuple[int, ...] = (1, 4)  # prompts per prefill cell
    decode_batch_sizes: tuple[int, ...] = (1, 4, 16, 48)  # sequences per decode cell
    decode_context_lengths: tuple[int, ...] = (32, 256, 1024)  # maximum context length of a decode cell
    num_decode_steps: int = 6  # decode steps measured per decode cell
    ragged: bool = True  # also profile decode cells whose contexts spread over [L/8, L]
    mixed: tuple[tuple[int, int], ...] = ((4, 64), (16, 256), (32, 32), (8, 1024))  # (decoding seqs, new prompt length)
    repeats: int = 2  # times each cell runs
    idle_gap_s: float = 0.1  # seconds the engine idles before every second run of a cell (0: never)
    max_cell_tokens: int = 16384  # maximum prompt tokens of one cell, which bounds its run time

    def __post_init__(self) -> None:
        for name in ("prefill_lengths", "prefill_batch_sizes", "decode_batch_sizes", "decode_context_lengths"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must hold positive integers, got {values!r}")
        for name in ("num_decode_steps", "repeats", "max_cell_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.idle_gap_s < 0:
            raise ValueError(f"idle_gap_s must be >= 0, got {self.idle_gap_s}")


SMALL_GRID = ProfileGrid(
    prefill_lengths=(8, 64), prefill_batch_sizes=(1, 2), decode_batch_sizes=(1, 4), decode_context_lengths=(16, 64),
    num_decode_steps=3, ragged=False, mixed=((2, 32),), repeats=1,
)


@dataclass
class ProfiledStep(StepRecord):
    """A step record of a profiling run, with the shape fields the fit may use and `elapsed`.

    `elapsed` is the time from the step's start until `LLMEngine.step()` returned: `duration`
    plus the engine's per-step work after the scheduler update (building request outputs).
    `after_idle` is 1 for the first step after the engine slept `ProfileGrid.idle_gap_s`.
    """

    num_attention_pairs: int = 0
    num_padded_decode_keys: int = 0
    num_padded_prefill_scores: int = 0
    after_idle: int = 0
    elapsed: float = 0.0


def _cells(grid: ProfileGrid, max_model_len: int):
    """(label, [(prompt_len, max_tokens)], joiners) of every cell; joiners join after two steps."""
    cells = []
    for length in grid.prefill_lengths:
        for batch in grid.prefill_batch_sizes:
            if length + 1 <= max_model_len:
                cells.append((f"prefill {batch}x{length}", [(length, 1)] * batch, []))
    steps = grid.num_decode_steps
    for context in grid.decode_context_lengths:
        if context + steps + 1 > max_model_len:
            continue
        for batch in grid.decode_batch_sizes:
            cells.append((f"decode {batch}x{context}", [(context, steps + 1)] * batch, []))
            if grid.ragged and batch > 1:
                lengths = np.linspace(max(1, context // 8), context, batch).astype(int)
                cells.append((f"ragged decode {batch}x<={context}", [(int(n), steps + 1) for n in lengths], []))
    for batch, prompt in grid.mixed:
        if prompt + 2 <= max_model_len:
            cells.append((f"mixed {batch}+{prompt}", [(64, steps + 3)] * batch, [(prompt, 2)]))
    cells = [cell for cell in cells if sum(p for p, _ in cell[1] + cell[2]) <= grid.max_cell_tokens]
    return [cell for cell in cells for _ in range(grid.repeats)]


def profile_engine(
    model: str = "tiny-llama",
    grid: ProfileGrid | None = None,
    num_threads: int | None = None,
    warmup_steps: int = 20,
    **engine_options,
) -> list[ProfiledStep]:
    """Run a real LLMEngine over `grid` and return one ProfiledStep per step, warm-up excluded.

    `engine_options` are EngineConfig fields (block_size, num_kv_blocks, max_num_batched_tokens,
    max_model_len, device, dtype, seed, load_format, ...). Torch uses `num_threads` threads
    (default: its current setting) for the whole run.
    """
    import torch

    from flashserve.engine import LLMEngine
    from flashserve.sampling_params import SamplingParams

    grid = grid or ProfileGrid()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    engine_options = {k: v for k, v in engine_options.items() if v is not None}
    engine_options.setdefault("max_num_seqs", max(max(grid.decode_batch_sizes) + 1, 2 * max(grid.prefill_batch_sizes)))
    engine = LLMEngine(model=model, **engine_options)

    cells = _cells(grid, engine.max_model_len)
    if not cells:
        raise ValueError(f"no profiling cell fits max_model_len={engine.max_model_len}; use shorter grid lengths")
    capacity = engine.num_kv_blocks * engine.config.block_size
    shapes: dict[int, StepShape] = {}
    elapsed: dict[int, float] = {}
    schedule = engine.scheduler.schedule
    idle = [False]  # True between an idle gap and the next step

    def recording_schedule(now: float):
        output = schedule(now)
        if not output.is_empty:
            shapes[output.step] = step_shape(output, after_idle=idle[0])
            idle[0] = False
        return output

    # NOTE: the wrapper only observes each SchedulerOutput, to record the padded shape terms
    # that a StepRecord does not carry; scheduling itself is unchanged.
    engine.scheduler.schedule = recording_schedule

    def run_cell(prompts, joiners, params_for, idle_gap: float = 0.0):
        if idle_gap > 0:
            time.sleep(idle_gap)
            idle[0] = True
        for prompt_len, max_tokens in prompts:
            engine.add_request(None, [PROMPT_TOKEN] * prompt_len, params_for(max_tokens))
        num_steps = 0
        while engine.has_unfinished_requests():
            if num_steps == 2:
                for prompt_len, max_tokens in joiners:
                    engine.add_request(None, [PROMPT_TOKEN] * prompt_len, params_for(max_tokens))
            engine.step()
            records = engine.scheduler.step_records
            if records:
                elapsed[records[-1].step] = engine.now() - records[-1].start_time
            num_steps += 1

    def params_for(max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    # warm-up: the first passes pay for allocation and kernel selection
    done = 0
    while done < warmup_steps:
        before = len(engine.scheduler.step_records)
        run_cell([(min(64, engine.max_model_len - 8), 8)] * 2, [], params_for)
        done += len(engine.scheduler.step_records) - before
    engine.reset_records()

    start = time.perf_counter()
    for index, (label, prompts, joiners) in enumerate(cells):
        needed = sum(p + m for p, m in prompts + joiners)
        if needed > capacity:
            logger.warning("skipping profiling cell %s: it needs %d KV slots, the cache has %d", label, needed, capacity)
            continue
        # every second cell of the list starts after an idle gap: with repeats=2, the second run of each cell
        run_cell(prompts, joiners, params_for, grid.idle_gap_s if index % 2 == 1 else 0.0)
        if (index + 1) % 10 == 0:
            logger.info("profiled %d/%d cells (%.0f s)", index + 1, len(cells), time.perf_counter() - start)

    profiled = []
    for record in engine.step_records():
        shape = shapes[record.step]
        profiled.append(ProfiledStep(
            **record.to_dict(),
            num_attention_pairs=shape.num_attention_pairs,
            num_padded_decode_keys=shape.num_padded_decode_keys,
            num_padded_prefill_scores=shape.num_padded_prefill_scores,
            after_idle=shape.after_idle,
            elapsed=elapsed.get(record.step, record.duration),
        ))
    logger.info("profiled %d steps over %d cells in %.1f s", len(profiled), len(cells), time.perf_counter() - start)
    return profiled


# fit


def _solve_nonnegative(matrix: np.ndarray, target: np.ndarray, loss: str) -> np.ndarray:
    """Least squares with every coefficient >= 0.

    loss "linear": scipy's NNLS, or without scipy an active-set loop that drops the most
    negative coefficient and solves again. loss "soft_l1": scipy's bounded least_squares with a
    robust loss, started from the NNLS solution, so that a few outlying steps (another process
    took the CPU) pull the fit less.
    """
    try:
        from scipy.optimize import least_squares, nnls
    except ImportError:
        if loss != "linear":
            raise ValueError(f"loss={loss!r} needs scipy; install scipy or use loss='linear'") from None
        nnls = None
    if nnls is not None:
        solution, _ = nnls(matrix, target)
    else:
        active = list(range(matrix.shape[1]))
        solution = np.zeros(matrix.shape[1])
        while active:
            coefficients, *_ = np.linalg.lstsq(matrix[:, active], target, rcond=None)
            if (coefficients >= 0).all():
                solution[active] = coefficients
                break
            del active[int(np.argmin(coefficients))]
    if loss == "linear":
        return solution

    result = least_squares(
        lambda x: matrix @ x - target, np.maximum(solution, 0.0), jac=lambda x: matrix,
        bounds=(0.0, np.inf), loss=loss, f_scale=ROBUST_SCALE,
    )
    return result.x


ROBUST_SCALE = 0.1  # relative residual at which the soft_l1 loss turns from quadratic to linear
LOSSES = ("soft_l1", "linear")


def fit(
    step_records: list[StepRecord],
    features: tuple[str, ...] | None = None,
    target: str = "elapsed",
    loss: str = "soft_l1",
    metadata: dict | None = None,
) -> FittedCostModel:
    """Fit step time = sum of coefficient x feature (coefficients >= 0) to measured steps.

    Residuals are relative (error / measured time), so short steps weigh as much as long ones.
    features: names from cost_model.FEATURES; None takes every feature the records carry (all of
    them for ProfiledStep records, the StepRecord fields for plain records).
    target: "elapsed" (step start until LLMEngine.step() returned, in ProfiledStep records;
    plain StepRecords fall back to "duration") or "duration" (schedule to update). loss:
    "soft_l1" (robust, needs scipy) or "linear" (plain non-negative least squares).
    """
    if target not in FIT_TARGETS:
        raise ValueError(f"target must be one of {FIT_TARGETS}, got {target!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    steps = [r for r in step_records if r.num_prefill_seqs + r.num_decode_seqs > 0]
    if features is None:
        features = tuple(f for f in FEATURES if f == "intercept" or (steps and getattr(steps[0], f, None) is not None))
    unknown = [name for name in features if name not in FEATURES]
    if unknown:
        raise ValueError(f"unknown features {unknown}; the known ones are {list(FEATURES)}")
    if len(steps) < len(features):
        raise ValueError(f"fitting {len(features)} coefficients needs at least as many steps, got {len(steps)}")

    times = np.array([getattr(r, target, None) or r.duration for r in steps], dtype=float)
    if (times <= 0).any():
        raise ValueError("every step time must be > 0 to fit relative errors")
    matrix = np.array([[feature_value(r, name) for name in features] for r in steps], dtype=float)

    # relative residuals: divide each row by its time; scale columns to a common magnitude so
    # that the solvers' tolerances treat every feature alike
    weighted = matrix / times[:, None]
    scale = np.abs(weighted).max(axis=0)
    scale[scale == 0] = 1.0
    solution = _solve_nonnegative(weighted / scale, np.ones(len(steps)), loss) / scale

    predicted = matrix @ solution
    relative_errors = np.abs(predicted - times) / times
    residual = float(((predicted - times) ** 2).sum())
    total = float(((times - times.mean()) ** 2).sum())
    quality = {
        "num_steps": len(steps),
        "target": target,
        "loss": loss,
        "r2": 1.0 - residual / total if total > 0 else None,
        "median_abs_relative_error": float(np.median(relative_errors)),
        "mean_abs_relative_error": float(relative_errors.mean()),
        "p90_abs_relative_error": float(np.percentile(relative_errors, 90)),
    }
    coefficients = {name: float(value) for name, value in zip(features, solution)}
    return FittedCostModel(coefficients, {**(metadata or {}), **quality})


# calibrate


def hardware_name(device: str = "auto") -> str:
    """Return the GPU's name for a CUDA device, else the CPU model string."""
    import torch

    from flashserve.model.runner import cpu_name, resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.cuda.get_device_name(resolved)
    return cpu_name()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("flash-serve", "torch", "transformers", "numpy", "scipy", "simpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def calibrate(
    model: str = "tiny-llama",
    out: str | os.PathLike | None = None,
    grid: ProfileGrid | None = None,
    num_threads: int | None = None,
    hardware: str | None = None,
    features: tuple[str, ...] | None = None,
    target: str = "elapsed",
    loss: str = "soft_l1",
    **engine_options,
) -> FittedCostModel:
    """Profile the engine over `grid`, fit the cost model and write it as JSON to `out` (if given).

    `hardware` is an optional label (for example a conf/hardware name) stored beside the
    detected CPU or GPU name. `engine_options` are EngineConfig fields, as in profile_engine.
    """
    import torch

    from flashserve.config import EngineConfig
    from flashserve.model.loader import resolve_model
    from flashserve.model.runner import resolve_device, resolve_dtype

    grid = grid or ProfileGrid()
    start = time.perf_counter()
    cpu_start = time.process_time()
    steps = profile_engine(model, grid, num_threads=num_threads, **engine_options)
    # CPU seconds per wall second outside the idle gaps. With one torch thread, a share well
    # below 1 means that another process took the CPU while the engine ran.
    busy_s = time.perf_counter() - start - grid.idle_gap_s * sum(step.after_idle for step in steps)
    cpu_share = (time.process_time() - cpu_start) / busy_s
    if torch.get_num_threads() == 1 and cpu_share < 0.9:
        logger.warning(
            "the profiling process got only %.2f CPU seconds per second: other processes took the CPU, so the "
            "fit predicts slower steps than an idle machine runs; calibrate on an idle machine", cpu_share,
        )
    options = {k: v for k, v in engine_options.items() if v is not None}
    defaults = EngineConfig()
    device = resolve_device(options.get("device", defaults.device))
    metadata_ = {
        "model": resolve_model(model).name,
        "model_path": str(model),
        "hardware": hardware_name(str(device)),
        "hardware_config": hardware,
        "device": str(device),
        "dtype": str(resolve_dtype(options.get("dtype", defaults.dtype), device)).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "block_size": options.get("block_size", defaults.block_size),
        "max_num_batched_tokens": options.get("max_num_batched_tokens", defaults.max_num_batched_tokens),
        "versions": package_versions(),
        "grid": {f.name: getattr(grid, f.name) for f in fields(grid)},
        "profiling_time_s": round(time.perf_counter() - start, 1),
        "profiling_cpu_share": round(cpu_share, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    cost_model = fit(steps, features=features, target=target, loss=loss, metadata=metadata_)
    logger.info(
        "fitted %s: median |relative error| %.1f%% over %d steps; coefficients %s",
        cost_model.describe(), 100 * cost_model.metadata["median_abs_relative_error"], len(steps),
        json.dumps({k: f"{v:.3g}" for k, v in cost_model.coefficients.items()}),
    )
    if out is not None:
        cost_model.save(out)
        logger.info("wrote %s", out)
    return cost_model
