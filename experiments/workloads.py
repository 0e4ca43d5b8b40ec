"""Workloads: request arrival times with prompt and output lengths.

Synthetic processes (Poisson, gamma with a burstiness setting, constant rate) and replay of the
Azure LLM inference trace 2023 (Patel et al., "Splitwise: Efficient generative LLM inference
using phase splitting", ISCA 2024; CC-BY 4.0). Every workload records the transformations
applied to it so that a report can list them.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

AZURE_TRACE_CITATION = (
    'Azure LLM inference trace 2023 (CC-BY 4.0): P. Patel, E. Choukse, C. Zhang, A. Shah, I. Goiri, '
    'S. Maleki, R. Bianchini, "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.'
)
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
ARRIVAL_PROCESSES = ("poisson", "gamma", "constant")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: when it arrives (seconds from the start) and its lengths in tokens."""

    request_id: str
    arrival_time: float
    prompt_len: int
    output_len: int


@dataclass
class Workload:
    name: str
    requests: list[RequestSpec]
    transformations: list[str] = field(default_factory=list)  # what was done to the source, in order
    source: dict = field(default_factory=dict)  # trace path, SHA-256 and citation, or the generator settings

    @property
    def duration(self) -> float:
        """Seconds from the first to the last arrival."""
        if not self.requests:
            return 0.0
        return self.requests[-1].arrival_time - self.requests[0].arrival_time

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([r.__dict__ for r in self.requests])


@dataclass
class LengthDist:
    """A token-length distribution.

    kind: "fixed" (always `mean`), "uniform" (integers in [low, high]), "lognormal" (median
    `mean`, log-space standard deviation `sigma`), or "trace" (resampled from the lengths of an
    Azure trace CSV at `trace_path`, column chosen by the caller). Samples are clipped to
    [low, high].
    """

    kind: str = "lognormal"
    mean: float = 128
    sigma: float = 0.6
    low: int = 1
    high: int = 1024
    trace_path: str | None = None

    def sample(self, rng: np.random.Generator, n: int, trace_column: str) -> np.ndarray:
        if self.kind == "fixed":
            values = np.full(n, self.mean)
        elif self.kind == "uniform":
            values = rng.integers(self.low, self.high + 1, size=n)
        elif self.kind == "lognormal":
            values = rng.lognormal(np.log(self.mean), self.sigma, size=n)
        elif self.kind == "trace":
            if not self.trace_path:
                raise ValueError("a 'trace' length distribution needs trace_path set to an Azure trace CSV")
            lengths = read_azure_trace(self.trace_path)[trace_column].to_numpy()
            values = rng.choice(lengths, size=n, replace=True) * (self.mean / np.median(lengths))
        else:
            raise ValueError(f"length distribution kind must be fixed, uniform, lognormal or trace, got {self.kind!r}")
        return np.clip(np.rint(values), self.low, self.high).astype(int)


def synthetic(
    process: str,
    rate: float,
    num_requests: int,
    prompt_len: LengthDist,
    output_len: LengthDist,
    seed: int,
    burstiness: float = 1.0,
    max_model_len: int | None = None,
    name: str | None = None,
) -> Workload:
    """Arrivals from a renewal process at `rate` requests/s.

    poisson: exponential gaps. gamma: gamma gaps with shape `burstiness` (1 is Poisson, below 1
    is burstier, above 1 smoother), as in vLLM's serving benchmark. constant: gaps of 1/rate.
    `rate` may be `inf` (every request at time 0).
    """
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(f"arrival process must be one of {ARRIVAL_PROCESSES}, got {process!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (inf sends everything at once), got {rate}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0 (1 is Poisson), got {burstiness}")

    rng = np.random.default_rng(seed)
    if np.isinf(rate):
        gaps = np.zeros(num_requests)
    elif process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=num_requests)
    elif process == "gamma":
        gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests)
    else:
        gaps = np.full(num_requests, 1.0 / rate)
    arrivals = np.cumsum(gaps) - gaps[0]

    prompts = prompt_len.sample(rng, num_requests, "ContextTokens")
    outputs = output_len.sample(rng, num_requests, "GeneratedTokens")
    transformations = [f"{process} arrivals at {rate} req/s" + (f", burstiness {burstiness}" if process == "gamma" else "")]
    transformations.append(f"prompt lengths: {_describe(prompt_len)}; output lengths: {_describe(output_len)}")
    requests = build_requests(arrivals, prompts, outputs, max_model_len, transformations)
    source = {"generator": process, "rate": rate, "num_requests": num_requests, "seed": seed, "burstiness": burstiness}
    return Workload(name or process, requests, transformations, source)


def _describe(dist: LengthDist) -> str:
    if dist.kind == "fixed":
        return f"fixed {dist.mean:g}"
    if dist.kind == "uniform":
        return f"uniform [{dist.low}, {dist.high}]"
    if dist.kind == "trace":
        return f"resampled from {Path(dist.trace_path or '').name}, scaled to median {dist.mean:g}, clipped to [{dist.low}, {dist.high}]"
    return f"lognormal median {dist.mean:g} sigma {dist.sigma:g}, clipped to [{dist.low}, {dist.high}]"


def fit_to_context(prompts: np.ndarray, outputs: np.ndarray, max_model_len: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Clip lengths so that prompt + output <= max_model_len (prompt first capped at max_model_len - 1)."""
    prompts = np.minimum(prompts, max_model_len - 1)
    outputs = np.minimum(outputs, max_model_len - prompts)
    changed = int(np.sum((prompts + outputs) >= max_model_len))
    note = f"clipped to prompt + output <= {max_model_len} tokens (max_model_len)" if changed else ""
    return prompts, np.maximum(outputs, 1), note


def build_requests(arrivals, prompts, outputs, max_model_len: int | None, transformations: list[str]) -> list[RequestSpec]:
    """RequestSpecs with ids req-0, req-1, ...; lengths first fitted to max_model_len (noted in `transformations`)."""
    if max_model_len is not None:
        prompts, outputs, note = fit_to_context(prompts, outputs, max_model_len)
        if note:
            transformations.append(note)
    return [
        RequestSpec(f"req-{i}", float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs))
    ]


def read_azure_trace(path: str | Path) -> pd.DataFrame:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Adds `arrival_time`, seconds since the first request. Raises ValueError for a missing file
    or wrong columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"trace file {path} not found; set the trace path (for example FLASHSERVE_TRACE_DIR or "
            f"workload.trace_path) to an Azure LLM inference trace CSV"
        )
    frame = pd.read_csv(path)
    missing = [c for c in AZURE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"trace file {path} lacks columns {missing}; an Azure trace CSV has {list(AZURE_COLUMNS)}, "
            f"this one has {list(frame.columns)}"
        )
    timestamps = pd.to_datetime(frame["TIMESTAMP"])
    frame["arrival_time"] = (timestamps - timestamps.min()).dt.total_seconds()
    return frame.sort_values("arrival_time", kind="stable").reset_index(drop=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def azure_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    max_model_len: int | None = None,
    name: str = "azure",
) -> Workload:
    """Replay an Azure trace: a time window, a request cap, a time scale and length scaling or clipping.

    time_scale multiplies arrival times (0.1 replays ten times faster); length_scale multiplies
    both prompt and output lengths before clipping.
    """
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if length_scale <= 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    frame = read_azure_trace(path)
    transformations = [f"read {len(frame)} requests from {Path(path).name}"]

    if start_s or duration_s is not None:
        end = float("inf") if duration_s is None else start_s + duration_s
        frame = frame[(frame["arrival_time"] >= start_s) & (frame["arrival_time"] < end)]
        transformations.append(f"time window [{start_s:g} s, {end:g} s): {len(frame)} requests")
    if max_requests is not None and len(frame) > max_requests:
        frame = frame.iloc[:max_requests]
        transformations.append(f"first {max_requests} requests kept")
    if frame.empty:
        raise ValueError(f"no request of {path} falls in the chosen window (start_s={start_s}, duration_s={duration_s})")

    arrivals = (frame["arrival_time"].to_numpy() - frame["arrival_time"].iloc[0]) * time_scale
    if time_scale != 1.0:
        transformations.append(f"arrival times scaled by {time_scale:g} ({1 / time_scale:g}x the original rate)")

    prompts = frame["ContextTokens"].to_numpy().astype(float)
    outputs = frame["GeneratedTokens"].to_numpy().astype(float)
    if length_scale != 1.0:
        prompts, outputs = prompts * length_scale, outputs * length_scale
        transformations.append(f"prompt and output lengths scaled by {length_scale:g}")
    prompts = np.maximum(np.rint(prompts), 1).astype(int)
    outputs = np.maximum(np.rint(outputs), 1).astype(int)
    if max_prompt_len is not None and (prompts > max_prompt_len).any():
        transformations.append(f"{int((prompts > max_prompt_len).sum())} prompts clipped to {max_prompt_len} tokens")
        prompts = np.minimum(prompts, max_prompt_len)
    if max_output_len is not None and (outputs > max_output_len).any():
        transformations.append(f"{int((outputs > max_output_len).sum())} outputs clipped to {max_output_len} tokens")
        outputs = np.minimum(outputs, max_output_len)
    requests = build_requests(arrivals, prompts, outputs, max_model_len, transformations)
    source = {"trace_path": str(Path(path).resolve()), "trace_sha256": file_sha256(path), "citation": AZURE_TRACE_CITATION}
    return Workload(name, requests, transformations, source)


def prompt_token_ids(spec: RequestSpec, vocab_size: int, seed: int = 0) -> list[int]:
    """Deterministic prompt token ids for a request of `spec.prompt_len` tokens.

    Ids are drawn from [3, min(vocab_size, 259)), which skips the usual special ids 0-2 and
    stays inside any byte-level or small vocabulary. Every system of a run gets the same ids.
    """
    rng = np.random.default_rng([seed, zlib.crc32(spec.request_id.encode())])
    high = max(4, min(vocab_size, 259))
    return rng.integers(3, high, size=spec.prompt_len).tolist()


WORKLOAD_KINDS = ("synthetic", "azure")


def from_config(cfg, seed: int, max_model_len: int | None = None) -> Workload:
    """Build the workload of a `workload/` config (experiments.config) with the run's root seed.

    Lengths are clipped so that prompt + output fits `max_model_len`. Raises ValueError naming
    the invalid setting.
    """
    kind = cfg["kind"]
    if kind == "synthetic":
        return synthetic(
            cfg["process"],
            float(cfg["rate"]),
            int(cfg["num_requests"]),
            LengthDist(**dict(cfg["prompt_len"])),
            LengthDist(**dict(cfg["output_len"])),
            seed,
            burstiness=float(cfg["burstiness"]),
            max_model_len=max_model_len,
            name=cfg["name"],
        )
    if kind == "azure":
        return azure_trace(
            cfg["trace_path"],
            start_s=float(cfg["start_s"]),
            duration_s=cfg["duration_s"],
            max_requests=cfg["max_requests"],
            time_scale=float(cfg["time_scale"]),
            length_scale=float(cfg["length_scale"]),
            max_prompt_len=cfg["max_prompt_len"],
            max_output_len=cfg["max_output_len"],
            max_model_len=max_model_len,
            name=cfg["name"],
        )
    raise ValueError(f"workload kind must be one of {WORKLOAD_KINDS}, got {kind!r}")


def to_json(workload: Workload) -> dict:
    """Describe the workload for workload.json: name, size, transformations and source."""
    frame = workload.to_frame()
    return {
        "name": workload.name,
        "num_requests": len(workload.requests),
        "duration_s": workload.duration,
        "mean_prompt_len": float(frame["prompt_len"].mean()) if len(frame) else None,
        "mean_output_len": float(frame["output_len"].mean()) if len(frame) else None,
        "transformations": list(workload.transformations),
        "source": dict(workload.source),
    }
