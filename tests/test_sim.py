"""Simulator invariants: determinism, conservation, queueing laws and event order under SimPy time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from experiments.metrics import requests_frame, steps_frame, summarize
from experiments.workloads import LengthDist, RequestSpec, synthetic
from flashserve.core import RequestRecord, SchedulerConfig, StepRecord
from sim import FittedCostModel, load_cost_model, simulate

MICRO_LLAMA = str(Path(__file__).parent / "data" / "micro-llama.yaml")

# Seconds per unit of each feature. Every value is a power of two, so sums of step times
# stay exact in binary floating point.
LINEAR_COSTS = {
    "intercept": 2.0**-7,
    "num_prefill_tokens": 2.0**-14,
    "num_decode_seqs": 2.0**-10,
    "num_context_tokens": 2.0**-18,
}


def linear_model() -> FittedCostModel:
    return FittedCostModel(dict(LINEAR_COSTS))


def workload(seed: int, num_requests: int = 60, rate: float = 20.0, prompt: int = 96, output: int = 48) -> list[RequestSpec]:
    return synthetic(
        "poisson", rate, num_requests,
        LengthDist("lognormal", mean=prompt, sigma=0.8, low=1, high=400),
        LengthDist("lognormal", mean=output, sigma=0.8, low=1, high=200),
        seed=seed,
    ).requests


def config(**overrides) -> SchedulerConfig:
    options = dict(num_kv_blocks=256, block_size=16, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=1024)
    options.update(overrides)
    return SchedulerConfig(**options)


def as_dicts(records) -> list[dict]:
    return [r.to_dict() for r in records]


# determinism and record schema


def test_same_inputs_give_identical_records():
    specs = workload(seed=3)
    first = simulate(specs, config(num_kv_blocks=40), linear_model())
    second = simulate(list(reversed(specs)), config(num_kv_blocks=40), linear_model())

    assert first.num_preemptions > 0, "the case should exercise preemption"
    assert as_dicts(first.request_records) == as_dicts(second.request_records)
    assert as_dicts(first.step_records) == as_dicts(second.step_records)


def test_different_seeds_give_different_records():
    first = simulate(workload(seed=1), config(), linear_model())
    second = simulate(workload(seed=2), config(), linear_model())
    assert as_dicts(first.request_records) != as_dicts(second.request_records)


def test_records_use_engine_schema():
    result = simulate(workload(seed=4, num_requests=10), config(), linear_model())

    assert all(type(r) is RequestRecord for r in result.request_records)
    assert all(type(r) is StepRecord for r in result.step_records)
    summary = summarize(requests_frame(result.request_records, "sim"), steps_frame(result.step_records, "sim"))
    assert summary["num_completed"] == 10
    assert summary["num_steps"] == len(result.step_records)


# conservation


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("kv_allocation", ["paged", "contiguous"])
def test_blocks_freed_and_outputs_complete(batching, kv_allocation):
    specs = workload(seed=5, num_requests=50)
    result = simulate(specs, config(num_kv_blocks=48, batching=batching, kv_allocation=kv_allocation), linear_model())
    scheduler = result.scheduler

    manager = scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(owner is None for owner in manager.block_owners())
    assert all(not r.block_ids for r in scheduler.requests.values())
    assert max(s.kv_blocks_used for s in result.step_records) <= 48

    lengths = {s.request_id: s.output_len for s in specs}
    for record in result.request_records:
        assert record.num_output_tokens == lengths[record.request_id]
        assert len(record.token_times) == lengths[record.request_id]
        assert record.finish_reason == "length"


def test_tight_cache_preempts_and_still_completes():
    result = simulate(workload(seed=6, num_requests=40), config(num_kv_blocks=40), linear_model())
    assert result.num_preemptions > 0
    assert sum(r.num_preemptions for r in result.request_records) == result.num_preemptions
    assert all(r.finish_reason == "length" for r in result.request_records)


# queueing laws


def time_average_in_system(records: list[RequestRecord]) -> tuple[float, float]:
    """Integral of N(t) over [first arrival, last finish] by an event sweep, and that span."""
    events = sorted([(r.arrival_time, 1) for r in records] + [(r.finish_time, -1) for r in records])
    start, end = events[0][0], events[-1][0]
    area = 0.0
    in_system = 0
    previous = start
    for time, change in events:
        area += in_system * (time - previous)
        in_system += change
        previous = time
    assert in_system == 0
    return area / (end - start), end - start


@pytest.mark.parametrize("batching,seed", [("continuous", 7), ("static", 8), ("continuous", 9)])
def test_littles_law(batching, seed):
    result = simulate(workload(seed=seed, num_requests=80), config(batching=batching), linear_model())
    records = result.request_records

    mean_in_system, span = time_average_in_system(records)
    throughput = len(records) / span
    mean_sojourn = sum(r.finish_time - r.arrival_time for r in records) / len(records)
    assert mean_in_system == pytest.approx(throughput * mean_sojourn, rel=1e-9)

    summary = summarize(requests_frame(records, "sim"), steps_frame(result.step_records, "sim"))
    assert summary["request_throughput"] == pytest.approx(throughput, rel=1e-12)
    assert summary["e2e"]["mean"] == pytest.approx(mean_sojourn, rel=1e-12)


def test_lone_request_latency_is_sum_of_steps():
    prompt, output = 100, 12
    result = simulate([RequestSpec("lone", 0.25, prompt, output)], config(), linear_model())
    record = result.request_records[0]

    c = LINEAR_COSTS
    prefill = c["intercept"] + c["num_prefill_tokens"] * prompt + c["num_context_tokens"] * prompt
    decodes = [c["intercept"] + c["num_decode_seqs"] + c["num_context_tokens"] * (prompt + i) for i in range(1, output)]
    assert record.first_token_time - record.arrival_time == pytest.approx(prefill, rel=1e-12)
    assert record.finish_time - record.arrival_time == pytest.approx(prefill + sum(decodes), rel=1e-12)
    assert len(result.step_records) == output


def test_lone_request_chunked_prefill():
    prompt, output, budget = 300, 3, 128
    result = simulate([RequestSpec("lone", 0.0, prompt, output)], config(max_num_batched_tokens=budget), linear_model())
    record = result.request_records[0]

    c = LINEAR_COSTS
    chunks = [(start, min(budget, prompt - start)) for start in range(0, prompt, budget)]
    prefill = sum(c["intercept"] + c["num_prefill_tokens"] * n + c["num_context_tokens"] * (s + n) for s, n in chunks)
    decodes = sum(c["intercept"] + c["num_decode_seqs"] + c["num_context_tokens"] * (prompt + i) for i in range(1, output))
    assert record.first_token_time == pytest.approx(prefill, rel=1e-12)
    assert record.finish_time == pytest.approx(prefill + decodes, rel=1e-12)
    assert len(result.step_records) == len(chunks) + output - 1


def test_static_batch_lasts_as_long_as_longest_member():
    outputs = [3, 9, 5, 2, 7, 4, 8, 6]
    specs = [RequestSpec(f"r{i}", 0.0, 20 + i, n) for i, n in enumerate(outputs)]
    result = simulate(specs, config(batching="static", max_num_seqs=4), linear_model())
    records = {r.request_id: r for r in result.request_records}

    first, second = [records[f"r{i}"] for i in range(4)], [records[f"r{i}"] for i in range(4, 8)]
    assert {r.first_scheduled_time for r in first} == {0.0}
    batch_end = max(r.finish_time for r in first)
    assert batch_end == records["r1"].finish_time  # the member with 9 output tokens
    assert {r.first_scheduled_time for r in second} == {batch_end}

    # one prefill step, then one decode step per further token of the longest member
    first_batch_steps = [s for s in result.step_records if s.start_time < batch_end]
    assert len(first_batch_steps) == max(outputs[:4])
    assert sum(s.duration for s in first_batch_steps) == pytest.approx(batch_end, rel=1e-12)


@pytest.mark.parametrize("seed,overrides", [
    (11, {}),
    (12, {"max_num_seqs": 4}),
    (13, {"num_kv_blocks": 60}),
    (14, {"kv_allocation": "contiguous"}),
    (15, {"max_num_batched_tokens": 256, "max_num_seqs": 32}),
])
def test_continuous_throughput_not_below_static(seed, overrides):
    specs = workload(seed=seed, num_requests=60, rate=40.0)
    results = {}
    for batching in ("continuous", "static"):
        result = simulate(specs, config(batching=batching, **overrides), linear_model())
        results[batching] = summarize(requests_frame(result.request_records, batching), steps_frame([], batching))
    assert results["continuous"]["output_throughput"] >= results["static"]["output_throughput"] * (1 - 1e-12)
    assert results["continuous"]["request_throughput"] >= results["static"]["request_throughput"] * (1 - 1e-12)


def test_continuous_beats_static_under_roofline():
    cost_model = load_cost_model("roofline", model=MICRO_LLAMA, hardware="a100")
    specs = workload(seed=16, num_requests=60, rate=200.0)
    throughput = {}
    for batching in ("continuous", "static"):
        result = simulate(specs, config(batching=batching), cost_model)
        throughput[batching] = summarize(requests_frame(result.request_records, batching), steps_frame([], batching))["output_throughput"]
    assert throughput["continuous"] >= throughput["static"]


# event order at one instant


def constant_steps(seconds: float) -> FittedCostModel:
    return FittedCostModel({"intercept": seconds})


def test_arrival_at_step_end_joins_next_step():
    specs = [RequestSpec("a", 0.0, 8, 3), RequestSpec("b", 1.0, 8, 1)]
    result = simulate(specs, config(), constant_steps(1.0))
    records = {r.request_id: r for r in result.request_records}

    assert records["b"].first_scheduled_time == 1.0
    assert result.step_records[0].num_waiting == 1
    second = result.step_records[1]
    assert second.start_time == 1.0
    assert (second.num_prefill_seqs, second.num_decode_seqs) == (1, 1)


def test_arrival_queued_during_step_still_precedes_next_step():
    # "c" arrives during the first step, so SimPy queues "b"'s arrival event after the step's end
    specs = [RequestSpec("a", 0.0, 8, 3), RequestSpec("c", 0.5, 8, 3), RequestSpec("b", 1.0, 8, 2)]
    result = simulate(specs, config(), constant_steps(1.0))
    records = {r.request_id: r for r in result.request_records}

    assert records["c"].first_scheduled_time == 1.0
    assert records["b"].first_scheduled_time == 1.0
    assert result.step_records[0].num_waiting == 2
    second = result.step_records[1]
    assert (second.num_prefill_seqs, second.num_decode_seqs) == (2, 1)


def test_idle_engine_admits_simultaneous_arrivals_together():
    specs = [RequestSpec(f"r{i}", 5.0, 8, 2) for i in range(3)]
    result = simulate(specs, config(), constant_steps(0.5))

    first = result.step_records[0]
    assert first.start_time == 5.0
    assert first.num_prefill_seqs == 3
    assert all(r.finish_time == 6.0 for r in result.request_records)


def test_first_step_after_idle_costs_extra():
    specs = [RequestSpec("a", 0.0, 8, 2), RequestSpec("b", 10.0, 8, 1), RequestSpec("c", 10.5, 8, 1)]
    result = simulate(specs, config(), FittedCostModel({"intercept": 1.0, "after_idle": 0.5}))

    durations = [s.duration for s in result.step_records]
    assert durations == [1.0, 1.0, 1.5, 1.0]  # "c" arrives while "b"'s step runs, so no idle wait


def test_idle_gaps_are_not_polled():
    specs = [RequestSpec("early", 0.0, 8, 2), RequestSpec("late", 1000.0, 8, 2)]
    result = simulate(specs, config(), constant_steps(0.25))
    assert len(result.step_records) == 4
    assert result.step_records[2].start_time == 1000.0
    assert result.simulated_time_s == 1000.5


# input checks


def test_request_too_long_is_rejected():
    with pytest.raises(ValueError, match="request big: .*max_model_len"):
        simulate([RequestSpec("big", 0.0, 1000, 100)], config(), linear_model())


def test_duplicate_request_id_is_rejected():
    with pytest.raises(ValueError, match="appears twice"):
        simulate([RequestSpec("x", 0.0, 8, 2), RequestSpec("x", 1.0, 8, 2)], config(), linear_model())


def test_empty_workload_gives_empty_records():
    result = simulate([], config(), linear_model())
    assert result.request_records == []
    assert result.step_records == []
    assert not math.isnan(result.wall_time_s)
