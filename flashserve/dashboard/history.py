"""The live page's memory of a server: step records and finished requests gathered over successive polls of /v1/stats."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

STEP_COLUMNS = [
    "step", "start_time", "duration", "num_prefill_tokens", "num_decode_seqs", "num_prefill_seqs",
    "num_context_tokens", "sum_sq_prefill_tokens", "num_sampled", "num_running", "num_waiting",
    "num_preempted", "kv_blocks_used", "kv_blocks_total", "kv_tokens_used", "kv_slots_allocated",
    "kv_slots_reserved",
]
TIMELINE_COLUMNS = [
    "time_s", "output_tokens_per_s", "kv_usage", "kv_fragmentation", "num_running", "num_waiting", "num_preempted",
]


@dataclass
class Histogram:
    """Counts of `values` in bins [edges[i], edges[i + 1]), with the number of values and their percentiles."""

    edges: np.ndarray
    counts: np.ndarray
    num_values: int
    p50: float
    p99: float

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"start": self.edges[:-1], "end": self.edges[1:], "count": self.counts})


class StatsHistory:
    """Step records of the last `window_s` seconds and the last `max_requests` finished requests of one server.

    Times are in the server's step clock (seconds since its engine started). `update()` takes one
    /v1/stats response and `since_step` is the value to send with the next poll.
    """

    def __init__(self, window_s: float = 300.0, max_requests: int = 2000):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.steps = pd.DataFrame(columns=STEP_COLUMNS)
        self.requests: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.max_requests = max_requests
        self.latest: dict | None = None
        self.last_step = -1
        self.num_resets = 0
        self._polls: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._clock_offset: float | None = None  # uptime_s minus the step clock, estimated from busy polls

    @property
    def since_step(self) -> int:
        return self.last_step

    def reset(self) -> None:
        """Forget everything, for example because the server restarted."""
        self.__init__(self.window_s, self.max_requests)

    def update(self, stats: dict) -> None:
        """Add one /v1/stats response: its new steps, its finished requests and its counters."""
        if self.latest is not None and self._restarted(stats):
            num_resets = self.num_resets + 1
            self.reset()
            self.num_resets = num_resets
        self.latest = stats

        new_steps = [s for s in stats.get("steps", []) if s["step"] > self.last_step]
        if new_steps:
            frame = pd.DataFrame(new_steps).reindex(columns=STEP_COLUMNS)
            self.steps = frame if self.steps.empty else pd.concat([self.steps, frame], ignore_index=True)
            self.last_step = int(frame["step"].max())
            last_end = float((frame["start_time"] + frame["duration"]).max())
            offset = float(stats["uptime_s"]) - last_end
            self._clock_offset = offset if self._clock_offset is None else min(self._clock_offset, offset)
        self._trim_steps()

        for record in stats.get("recent_requests", []):
            request_id = str(record["request_id"])
            self.requests[request_id] = record
            self.requests.move_to_end(request_id)
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)

        self._polls.append((float(stats["uptime_s"]), int(stats["output_tokens_total"])))

    def _restarted(self, stats: dict) -> bool:
        previous = self.latest
        return (
            float(stats["uptime_s"]) < float(previous["uptime_s"])
            or int(stats["output_tokens_total"]) < int(previous["output_tokens_total"])
            or int(stats.get("next_step", self.last_step)) < self.last_step
        )

    def _trim_steps(self) -> None:
        if self.steps.empty:
            return
        horizon = self.now() - self.window_s
        ends = self.steps["start_time"] + self.steps["duration"]
        if ends.iloc[0] < horizon:
            self.steps = self.steps[ends >= horizon].reset_index(drop=True)

    def now(self) -> float:
        """Estimate the server's current time in the step clock: uptime minus the estimated clock offset, and
        never before the end of the last step."""
        if self.steps.empty:
            return 0.0 if self.latest is None else float(self.latest["uptime_s"]) - (self._clock_offset or 0.0)
        last_end = float((self.steps["start_time"] + self.steps["duration"]).max())
        if self.latest is None or self._clock_offset is None:
            return last_end
        return max(last_end, float(self.latest["uptime_s"]) - self._clock_offset)

    def output_tokens_per_s(self, over_s: float = 5.0) -> float | None:
        """Output tokens per second over about the last `over_s` seconds of polls; None before two polls."""
        if len(self._polls) < 2:
            return None
        end_time, end_tokens = self._polls[-1]
        start_time, start_tokens = self._polls[0]
        for poll_time, poll_tokens in reversed(self._polls):
            start_time, start_tokens = poll_time, poll_tokens
            if end_time - poll_time >= over_s:
                break
        if end_time <= start_time:
            return None
        return (end_tokens - start_tokens) / (end_time - start_time)

    def timeline(self, max_points: int = 200) -> pd.DataFrame:
        """Step records binned over time: one row per bin of at least 1 s, at most `max_points` rows.

        Throughput is the output tokens sampled in a bin divided by its width; the current, still
        open bin is left out of it. Cache state and queue lengths are taken at the last step of a
        bin and carried over bins without steps, because only a step changes them (an abort also
        frees blocks, which shows at the next step).
        """
        if self.steps.empty:
            return pd.DataFrame(columns=TIMELINE_COLUMNS)
        steps = self.steps
        now = self.now()
        first = float(steps["start_time"].min())
        span = max(now - first, 1.0)
        bin_s = max(1.0, span / max_points)
        ends = steps["start_time"] + steps["duration"]
        bins = np.floor(ends.to_numpy(dtype=float) / bin_s).astype(np.int64)

        grouped = steps.assign(bin=bins).groupby("bin")
        per_bin = pd.DataFrame({
            "num_sampled": grouped["num_sampled"].sum(),
            "num_preempted": grouped["num_preempted"].sum(),
            "kv_blocks_used": grouped["kv_blocks_used"].last(),
            "kv_blocks_total": grouped["kv_blocks_total"].last(),
            "kv_tokens_used": grouped["kv_tokens_used"].last(),
            "kv_slots_allocated": grouped["kv_slots_allocated"].last(),
            "num_running": grouped["num_running"].last(),
            "num_waiting": grouped["num_waiting"].last(),
        })
        all_bins = np.arange(int(bins.min()), int(math.floor(now / bin_s)) + 1)
        per_bin = per_bin.reindex(all_bins)
        state = ["kv_blocks_used", "kv_blocks_total", "kv_tokens_used", "kv_slots_allocated", "num_running",
                 "num_waiting"]
        per_bin[state] = per_bin[state].ffill()
        per_bin[["num_sampled", "num_preempted"]] = per_bin[["num_sampled", "num_preempted"]].fillna(0)

        allocated = per_bin["kv_slots_allocated"].astype(float)
        timeline = pd.DataFrame({
            "time_s": (per_bin.index.to_numpy() + 1) * bin_s,
            "output_tokens_per_s": per_bin["num_sampled"].astype(float) / bin_s,
            "kv_usage": per_bin["kv_blocks_used"].astype(float) / per_bin["kv_blocks_total"].astype(float),
            "kv_fragmentation": (1.0 - per_bin["kv_tokens_used"].astype(float) / allocated).where(allocated > 0, 0.0),
            "num_running": per_bin["num_running"].astype(float),
            "num_waiting": per_bin["num_waiting"].astype(float),
            "num_preempted": per_bin["num_preempted"].astype(float),
        }).reset_index(drop=True)
        timeline.loc[timeline.index[-1], "output_tokens_per_s"] = np.nan
        return timeline

    def time_domain(self, timeline: pd.DataFrame, min_span_s: float = 30.0) -> tuple[float, float]:
        """Compute the x range of the timeline charts: from the first bin, or `min_span_s` before now but
        not before 0, to now."""
        end = max(self.now(), float(timeline["time_s"].max()) if not timeline.empty else 0.0)
        start = float(timeline["time_s"].min()) if not timeline.empty else end
        return max(0.0, min(start, end - min_span_s)), end

    def ttft_histogram(self, num_bins: int = 30) -> Histogram | None:
        """Time to first token of the recent finished requests, in milliseconds."""
        values = [r["ttft"] for r in self.requests.values() if r.get("ttft") is not None]
        return _histogram(np.asarray(values, dtype=float) * 1e3, num_bins)

    def itl_histogram(self, num_bins: int = 30) -> Histogram | None:
        """Inter-token latencies of the recent finished requests, in milliseconds."""
        values = [gap for r in self.requests.values() for gap in (r.get("itl") or [])]
        return _histogram(np.asarray(values, dtype=float) * 1e3, num_bins)


def _histogram(values: np.ndarray, num_bins: int) -> Histogram | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + max(abs(low) * 0.01, 1e-3)
    counts, edges = np.histogram(values, bins=num_bins, range=(low, high))
    return Histogram(
        edges=edges,
        counts=counts,
        num_values=int(values.size),
        p50=float(np.percentile(values, 50)),
        p99=float(np.percentile(values, 99)),
    )
