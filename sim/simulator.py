"""Discrete-event simulation of the serving engine: the real scheduler under SimPy time.

The simulator drives the same `flashserve.core.Scheduler` (and its `BlockManager`) as
`LLMEngine`. Only the forward pass is replaced: a cost model turns each step's batch shape into
a duration. Two SimPy processes share one scheduler:

- arrivals: submits each request at its arrival time; all requests of one instant at once;
- engine: requests a step from the scheduler, waits its predicted duration, then applies it
  with `Scheduler.update` (every sampled token is id 0 and requests stop at max_tokens). With
  nothing to run it waits for the next arrival instead of polling, and the step after such a
  wait is marked as following an idle period for the cost model.

Order at one simulated instant t: first every arrival at t is submitted, then the step that ends
at t is applied (tokens, finishes), then the next step is scheduled. So a request arriving at t
joins the step that starts at t, and the record of the step ending at t counts it as waiting.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import simpy

from experiments.workloads import RequestSpec
from flashserve.core import Request, RequestRecord, Scheduler, SchedulerConfig, StepRecord, StopCriteria
from sim.cost_model import CostModel

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 10.0  # wall-clock seconds between progress log lines


@dataclass
class SimResult:
    """Records of one simulated run, in the engine's schema, and how long the simulation took."""

    request_records: list[RequestRecord]
    step_records: list[StepRecord]
    wall_time_s: float  # wall-clock seconds spent simulating (records excluded)
    scheduler_config: SchedulerConfig
    cost_model: str  # the cost model's description
    is_estimate: bool  # True when the cost model is a roofline estimate
    num_preemptions: int = 0
    simulated_time_s: float = 0.0  # simulated seconds from time 0 to the last event
    scheduler: Scheduler | None = None  # the scheduler after the run, for inspecting its final state


class _ZeroTokens(dict):
    """Sampled tokens of a simulated step: every lookup returns token id 0."""

    def __missing__(self, key: str) -> int:
        return 0


def make_request(spec: RequestSpec) -> Request:
    """Build a scheduler request of `spec`'s lengths that stops at exactly `spec.output_len` tokens."""
    return Request(
        request_id=spec.request_id,
        prompt_token_ids=[0] * spec.prompt_len,
        stop=StopCriteria(max_tokens=spec.output_len, ignore_eos=True),
        arrival_time=spec.arrival_time,
    )


class _Simulation:
    def __init__(self, specs: list[RequestSpec], scheduler: Scheduler, cost_model: CostModel):
        self.env = simpy.Environment()
        self.specs = specs
        self.scheduler = scheduler
        self.cost_model = cost_model
        self.wakeup: simpy.Event | None = None
        self.arrivals_done = not specs
        # simulated time at which the pending arrival event fires (inf when none is pending)
        self.next_arrival_at = specs[0].arrival_time if specs else math.inf
        self._last_log = time.perf_counter()

    def arrivals(self):
        env = self.env
        specs = self.specs
        scheduler = self.scheduler
        index = 0
        while index < len(specs):
            arrival_time = specs[index].arrival_time
            if arrival_time > env.now:
                delay = arrival_time - env.now
                self.next_arrival_at = env.now + delay  # the time SimPy computes for the timeout
                yield env.timeout(delay)

            # NOTE: specs at the same time (or, after float rounding, before now) go in together,
            # so that the engine's check of next_arrival_at finds none left at this instant.
            while index < len(specs) and specs[index].arrival_time <= env.now:
                scheduler.add_request(make_request(specs[index]))
                index += 1
            self.next_arrival_at = specs[index].arrival_time if index < len(specs) else math.inf
            if self.wakeup is not None and not self.wakeup.triggered:
                self.wakeup.succeed()

        self.arrivals_done = True
        self.next_arrival_at = math.inf

    def engine(self):
        env = self.env
        scheduler = self.scheduler
        step_time = self.cost_model.step_time
        sampled = _ZeroTokens()
        num_steps = 0
        after_idle = False
        while True:
            # an arrival due at this instant is still queued in SimPy: let it run first
            if self.next_arrival_at <= env.now:
                yield env.timeout(0)
                continue

            if not scheduler.has_unfinished():
                if self.arrivals_done:
                    return
                self.wakeup = env.event()
                yield self.wakeup
                self.wakeup = None
                after_idle = True
                continue

            output = scheduler.schedule(env.now)
            if output.is_empty:
                raise RuntimeError(
                    f"the scheduler scheduled nothing at t={env.now:.6f} s with {len(scheduler.waiting)} waiting and "
                    f"{len(scheduler.running)} running requests"
                )
            yield env.timeout(step_time(output, after_idle))
            after_idle = False
            while self.next_arrival_at <= env.now:
                yield env.timeout(0)
            scheduler.update(output, sampled, env.now)

            num_steps += 1
            if num_steps % 4096 == 0:
                self._log_progress(num_steps)

    def _log_progress(self, num_steps: int) -> None:
        wall = time.perf_counter()
        if wall - self._last_log < PROGRESS_INTERVAL_S:
            return
        self._last_log = wall
        logger.info(
            "simulated %.1f s: %d steps, %d/%d requests finished",
            self.env.now, num_steps, len(self.scheduler.finished), len(self.specs),
        )


def simulate(
    workload_requests: list[RequestSpec],
    scheduler_config: SchedulerConfig,
    cost_model: CostModel,
) -> SimResult:
    """Replay `workload_requests` through the scheduler with `cost_model` step times.

    Every request must fit `scheduler_config`: prompt + output within max_model_len and within
    the KV cache. Otherwise ValueError names the first one that does not. Returns the engine's
    request and step records, in simulated seconds from time 0.
    """
    specs = sorted(workload_requests, key=lambda spec: spec.arrival_time)
    scheduler = Scheduler(scheduler_config)
    seen = set()
    for spec in specs:
        if spec.request_id in seen:
            raise ValueError(f"request id {spec.request_id!r} appears twice in the workload")
        seen.add(spec.request_id)
        if spec.output_len < 1:
            raise ValueError(f"request {spec.request_id}: output_len must be at least 1, got {spec.output_len}")
        if spec.arrival_time < 0 or not math.isfinite(spec.arrival_time):
            raise ValueError(f"request {spec.request_id}: arrival_time must be finite and >= 0, got {spec.arrival_time}")
        try:
            scheduler.validate(spec.prompt_len, spec.output_len)
        except ValueError as error:
            raise ValueError(f"request {spec.request_id}: {error}") from None

    simulation = _Simulation(specs, scheduler, cost_model)
    env = simulation.env
    start = time.perf_counter()
    env.process(simulation.arrivals())
    env.process(simulation.engine())
    env.run()
    wall_time = time.perf_counter() - start

    unfinished = len(scheduler.waiting) + len(scheduler.running)
    if unfinished:
        raise RuntimeError(f"the simulation ended with {unfinished} unfinished requests")
    logger.info(
        "simulated %d requests, %d steps, %.1f s of simulated time in %.2f s",
        len(specs), len(scheduler.step_records), env.now, wall_time,
    )
    return SimResult(
        request_records=scheduler.request_records(),
        step_records=scheduler.step_records,
        wall_time_s=wall_time,
        scheduler_config=scheduler_config,
        cost_model=cost_model.describe(),
        is_estimate=cost_model.is_estimate,
        num_preemptions=scheduler.num_preemptions,
        simulated_time_s=env.now,
        scheduler=scheduler,
    )
