"""Scheduler and block manager rules, driven without a model (time is passed in)."""

from __future__ import annotations

import random

import pytest

from flashserve.core import BlockManager, Request, Scheduler, SchedulerConfig, StopCriteria


def make_request(request_id: str, prompt_len: int, max_tokens: int, arrival: float = 0.0) -> Request:
    return Request(request_id, [5] * prompt_len, StopCriteria(max_tokens=max_tokens, ignore_eos=True), arrival)


def run_step(scheduler: Scheduler, now: float):
    output = scheduler.schedule(now)
    sampled = {s.request.request_id: 7 for s in output.scheduled if s.samples}
    finished = scheduler.update(output, sampled, now + 1)
    return output, finished


def run_to_end(scheduler: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while scheduler.has_unfinished():
        run_step(scheduler, float(steps))
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return steps


def assert_blocks_conserved(scheduler: Scheduler) -> None:
    manager = scheduler.block_manager
    owned = [b for r in scheduler.requests.values() for b in r.block_ids]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert manager.num_free_blocks + len(owned) == manager.num_blocks


def test_block_manager_allocates_on_demand():
    manager = BlockManager(num_blocks=4, block_size=4)
    request = make_request("a", 5, 3)
    manager.allocate(request, 5)
    assert len(request.block_ids) == 2
    manager.allocate(request, 8)
    assert len(request.block_ids) == 2
    assert not manager.can_allocate(request, 17)
    with pytest.raises(RuntimeError, match="needs 3 more KV blocks"):
        manager.allocate(request, 20)
    assert manager.block_owners() == ["a", "a", None, None]
    manager.free(request)
    assert manager.num_free_blocks == 4


def test_chunked_prefill_respects_token_budget():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=10))
    scheduler.add_request(make_request("long", 25, 2))
    scheduler.add_request(make_request("short", 3, 2))
    chunks = []
    while scheduler.has_unfinished():
        output, _ = run_step(scheduler, 0.0)
        assert sum(s.num_new_tokens for s in output.scheduled) <= 10
        chunks.append([(s.request.request_id, s.num_new_tokens, s.samples) for s in output.scheduled])
    assert chunks[0] == [("long", 10, False)]
    assert chunks[1] == [("long", 10, False)]
    # the last prefill chunk and the short prompt share a step
    assert chunks[2] == [("long", 5, True), ("short", 3, True)]
    assert chunks[3] == [("long", 1, True), ("short", 1, True)]


def test_decode_and_prefill_mixed_in_one_step():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=32))
    scheduler.add_request(make_request("first", 4, 5))
    run_step(scheduler, 0.0)
    scheduler.add_request(make_request("second", 6, 5))
    output, _ = run_step(scheduler, 1.0)
    assert output.num_decode_seqs == 1
    assert output.num_prefill_tokens == 6
    record = scheduler.step_records[-1]
    assert record.num_decode_seqs == 1
    assert record.num_prefill_tokens == 6
    assert record.sum_sq_prefill_tokens == 36
    assert record.num_context_tokens == 5 + 6


def test_preemption_takes_newest_running_request():
    # 3 requests of 4-token prompts fill 3 of 4 blocks. After the first token each needs a
    # second block, so r0 takes the free one and r1 forces the newest, r2, out.
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=4, block_size=4, max_num_batched_tokens=64))
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 4, 8, arrival=i))
    run_step(scheduler, 0.0)
    assert [r.request_id for r in scheduler.running] == ["r0", "r1", "r2"]
    output, _ = run_step(scheduler, 1.0)
    assert output.preempted == ["r2"]
    assert [s.request.request_id for s in output.scheduled] == ["r0", "r1"]
    assert scheduler.waiting[0].request_id == "r2"
    assert scheduler.requests["r2"].num_computed_tokens == 0
    assert scheduler.requests["r2"].num_preemptions == 1
    assert_blocks_conserved(scheduler)
    run_to_end(scheduler)
    assert all(r.num_output_tokens == 8 for r in scheduler.requests.values())
    assert scheduler.block_manager.num_free_blocks == 4


def test_recompute_prefills_prompt_and_output_so_far():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=4, block_size=4, max_num_batched_tokens=64))
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 4, 8))
    for step in range(3):
        run_step(scheduler, float(step))
    victim = scheduler.requests["r2"]
    generated = victim.num_output_tokens
    assert generated > 0
    while victim in scheduler.waiting:
        output, _ = run_step(scheduler, 10.0)
    chunk = next(s for s in output.scheduled if s.request is victim)
    assert chunk.start == 0
    assert chunk.num_new_tokens == 4 + generated
    assert chunk.is_prefill


def test_static_batching_admits_only_when_idle():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4, max_num_seqs=2, batching="static"))
    scheduler.add_request(make_request("a", 4, 2))
    scheduler.add_request(make_request("b", 4, 6))
    scheduler.add_request(make_request("c", 4, 1))
    first, _ = run_step(scheduler, 0.0)
    assert {s.request.request_id for s in first.scheduled} == {"a", "b"}
    # "a" finishes after 2 tokens, but "c" waits until "b" (the batch's longest) is done
    while scheduler.requests["b"].status.value != "finished":
        output, _ = run_step(scheduler, 1.0)
        assert all(s.request.request_id != "c" for s in output.scheduled)
    output, _ = run_step(scheduler, 2.0)
    assert [s.request.request_id for s in output.scheduled] == ["c"]


def test_continuous_batching_fills_freed_slot():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4, max_num_seqs=2))
    scheduler.add_request(make_request("a", 4, 2))
    scheduler.add_request(make_request("b", 4, 6))
    scheduler.add_request(make_request("c", 4, 1))
    run_step(scheduler, 0.0)
    run_step(scheduler, 1.0)  # "a" finishes
    output, _ = run_step(scheduler, 2.0)
    assert {s.request.request_id for s in output.scheduled} == {"b", "c"}


def test_contiguous_reserves_prompt_plus_max_tokens():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=10, block_size=4, kv_allocation="contiguous"))
    scheduler.add_request(make_request("a", 5, 11))  # 16 tokens: 4 blocks
    scheduler.add_request(make_request("b", 5, 20))  # 25 tokens: 7 blocks, does not fit next to "a"
    output, _ = run_step(scheduler, 0.0)
    assert [s.request.request_id for s in output.scheduled] == ["a"]
    assert len(scheduler.requests["a"].block_ids) == 4
    record = scheduler.step_records[-1]
    assert record.kv_slots_allocated == 16
    assert record.kv_tokens_used == 5
    assert record.kv_slots_reserved == 8  # two blocks not touched yet
    run_to_end(scheduler)
    assert scheduler.num_preemptions == 0
    assert scheduler.block_manager.num_free_blocks == 10


def test_paged_never_reserves():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=10, block_size=4))
    scheduler.add_request(make_request("a", 5, 11))
    run_step(scheduler, 0.0)
    record = scheduler.step_records[-1]
    assert record.kv_slots_allocated == 8
    assert record.kv_slots_reserved == 0


def test_fcfs_head_blocks_later_requests():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=8, block_size=4, kv_allocation="contiguous"))
    scheduler.add_request(make_request("a", 4, 12))  # 4 blocks
    scheduler.add_request(make_request("b", 4, 16))  # 5 blocks: must wait
    scheduler.add_request(make_request("c", 2, 2))  # 1 block: would fit, but FCFS keeps it behind "b"
    output, _ = run_step(scheduler, 0.0)
    assert [s.request.request_id for s in output.scheduled] == ["a"]


def test_validate_messages_name_limits():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=4, block_size=4, max_model_len=32))
    with pytest.raises(ValueError, match="max_model_len=32"):
        scheduler.add_request(make_request("a", 40, 1))
    with pytest.raises(ValueError, match=r"lower max_tokens to at most 22"):
        scheduler.add_request(make_request("b", 10, 30))
    with pytest.raises(ValueError, match="whole cache has 4"):
        scheduler.add_request(make_request("c", 10, 10))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add_request(make_request("d", 0, 1))
    assert not scheduler.has_unfinished()


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("kv_allocation", ["paged", "contiguous"])
def test_random_workload_conserves_blocks(batching, kv_allocation):
    rng = random.Random(1)
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                                          batching=batching, kv_allocation=kv_allocation))
    expected = {}
    step = 0
    for i in range(40):
        request = make_request(f"r{i}", rng.randint(1, 30), rng.randint(1, 30))
        scheduler.add_request(request)
        expected[request.request_id] = request.stop.max_tokens
        for _ in range(rng.randint(0, 3)):
            run_step(scheduler, float(step))
            step += 1
            assert_blocks_conserved(scheduler)
            assert len(scheduler.running) <= 6
        if rng.random() < 0.1 and scheduler.running:
            scheduler.abort_request(scheduler.running[-1].request_id, float(step))
            expected.pop(scheduler.finished[-1].request_id)
    run_to_end(scheduler)
    assert_blocks_conserved(scheduler)
    assert scheduler.block_manager.num_free_blocks == 24
    for request_id, max_tokens in expected.items():
        assert scheduler.requests[request_id].num_output_tokens == max_tokens
