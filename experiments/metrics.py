"""Serving metrics, computed once from the shared request and step tables.

Definitions follow vLLM's serving benchmark (benchmarks/benchmark_serving.py):
- TTFT: first token time - arrival time.
- TPOT: (E2E latency - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: every gap between consecutive output tokens of a request, pooled over requests.
- E2E latency: finish time - arrival time.
- duration: last finish - first arrival; request throughput = completed requests / duration;
  output throughput = output tokens / duration.
- goodput: completed requests per second that meet every SLO given (TTFT, TPOT, E2E).
KV fragmentation is 1 - tokens stored / token slots allocated, averaged over steps weighted by
step duration. It splits into internal fragmentation (the unused tail of partly filled blocks)
and reservation (blocks reserved ahead of need).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from flashserve.core.records import RequestRecord, StepRecord

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")


def requests_frame(records: list[RequestRecord], system: str) -> pd.DataFrame:
    """Request records as a table with a `system` column and derived latencies in seconds."""
    frame = pd.DataFrame([r.to_dict() for r in records])
    if frame.empty:
        frame = pd.DataFrame(columns=list(RequestRecord.__dataclass_fields__))
    frame.insert(0, "system", system)
    return add_latencies(frame)


def steps_frame(records: list[StepRecord], system: str) -> pd.DataFrame:
    frame = pd.DataFrame([r.to_dict() for r in records])
    if frame.empty:
        frame = pd.DataFrame(columns=list(StepRecord.__dataclass_fields__))
    frame.insert(0, "system", system)
    return frame


def add_latencies(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ttft, e2e and tpot columns (seconds) to a request table."""
    frame = frame.copy()
    frame["ttft"] = frame["first_token_time"].astype(float) - frame["arrival_time"].astype(float)
    frame["e2e"] = frame["finish_time"].astype(float) - frame["arrival_time"].astype(float)
    outputs = frame["num_output_tokens"].astype(float)
    frame["tpot"] = np.where(outputs > 1, (frame["e2e"] - frame["ttft"]) / (outputs - 1).clip(lower=1), np.nan)
    return frame


def completed(frame: pd.DataFrame) -> pd.DataFrame:
    """Requests that finished normally ("stop" or "length")."""
    return frame[frame["finish_reason"].isin(["stop", "length"])]


def inter_token_latencies(frame: pd.DataFrame) -> np.ndarray:
    gaps = [np.diff(np.asarray(times, dtype=float)) for times in frame["token_times"] if times is not None and len(times) > 1]
    return np.concatenate(gaps) if gaps else np.array([])


def _stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(values.mean()), **{f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}}


@dataclass
class SLO:
    """Service-level objectives for goodput, in seconds; None leaves a metric unconstrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


def summarize_requests(frame: pd.DataFrame, slo: SLO | None = None) -> dict:
    """Throughput, latency percentiles, goodput and counts of one system's requests."""
    done = completed(frame)
    num_failed = int(len(frame) - len(done))
    if done.empty:
        return {"num_requests": int(len(frame)), "num_completed": 0, "num_failed": num_failed}

    start = float(frame["arrival_time"].min())
    end = float(done["finish_time"].max())
    duration = max(end - start, 1e-9)
    output_tokens = int(done["num_output_tokens"].sum())
    prompt_tokens = int(done["num_prompt_tokens"].sum())

    summary = {
        "num_requests": int(len(frame)),
        "num_completed": int(len(done)),
        "num_failed": num_failed,
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + prompt_tokens) / duration,
        "total_output_tokens": output_tokens,
        "total_prompt_tokens": prompt_tokens,
        "num_preemptions": int(frame["num_preemptions"].fillna(0).sum()),
        "ttft": _stats(done["ttft"]),
        "tpot": _stats(done["tpot"]),
        "itl": _stats(inter_token_latencies(done)),
        "e2e": _stats(done["e2e"]),
    }
    if slo is not None and any(v is not None for v in (slo.ttft, slo.tpot, slo.e2e)):
        good = np.ones(len(done), dtype=bool)
        for name in ("ttft", "tpot", "e2e"):
            limit = getattr(slo, name)
            if limit is not None:
                good &= ~(done[name].to_numpy(dtype=float) > limit)
        summary["goodput"] = float(good.sum()) / duration
    return summary


def summarize_steps(frame: pd.DataFrame) -> dict:
    """Time-weighted KV usage and fragmentation, peak usage and batch sizes of one system's steps."""
    if frame.empty:
        return {}
    weights = frame["duration"].to_numpy(dtype=float)
    if weights.sum() <= 0:
        weights = np.ones(len(frame))
    allocated = frame["kv_slots_allocated"].to_numpy(dtype=float)
    used = frame["kv_tokens_used"].to_numpy(dtype=float)
    reserved = frame["kv_slots_reserved"].to_numpy(dtype=float)
    has_blocks = allocated > 0
    safe = np.where(has_blocks, allocated, 1.0)
    total = np.where(has_blocks, 1.0 - used / safe, 0.0)
    reservation = np.where(has_blocks, reserved / safe, 0.0)
    internal = total - reservation
    usage = frame["kv_blocks_used"].to_numpy(dtype=float) / frame["kv_blocks_total"].to_numpy(dtype=float)
    batch = frame["num_prefill_seqs"].to_numpy(dtype=float) + frame["num_decode_seqs"].to_numpy(dtype=float)

    def weighted(values: np.ndarray, mask: np.ndarray | None = None) -> float:
        w = weights if mask is None else weights * mask
        return float((values * w).sum() / w.sum()) if w.sum() > 0 else 0.0

    return {
        "num_steps": int(len(frame)),
        "kv_fragmentation": weighted(total, has_blocks),
        "kv_fragmentation_internal": weighted(internal, has_blocks),
        "kv_fragmentation_reservation": weighted(reservation, has_blocks),
        "kv_usage_mean": weighted(usage),
        "kv_usage_peak": float(usage.max()),
        "batch_size_mean": weighted(batch),
        "step_time_mean": float(frame["duration"].mean()),
    }


def summarize(requests: pd.DataFrame, steps: pd.DataFrame, slo: SLO | None = None) -> dict:
    """Summarize one system: request metrics plus step (KV) metrics."""
    return {**summarize_requests(requests, slo), **summarize_steps(steps)}


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured, or None when either is missing or measured is 0."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


ERROR_METRICS = (
    ("request_throughput", None), ("output_throughput", None),
    ("ttft", "mean"), ("ttft", "p50"), ("ttft", "p90"),
    ("tpot", "mean"), ("tpot", "p50"), ("tpot", "p90"),
    ("e2e", "mean"), ("e2e", "p50"), ("e2e", "p90"),
)


def prediction_errors(predicted: dict, measured: dict) -> dict[str, float | None]:
    """Relative error of each headline metric of a predicted system against its measured twin."""
    errors = {}
    for metric, stat in ERROR_METRICS:
        key = metric if stat is None else f"{metric}_{stat}"
        p = predicted.get(metric) if stat is None else (predicted.get(metric) or {}).get(stat)
        m = measured.get(metric) if stat is None else (measured.get(metric) or {}).get(stat)
        errors[key] = relative_error(p, m)
    return errors
