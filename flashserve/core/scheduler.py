"""Iteration-level scheduler: admission, batching policy, KV allocation, preemption, finishing.

The engine and the simulator both drive this class. It never reads a clock: every method that
records a time takes `now` from the caller, so a run under simulated time is deterministic.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

from flashserve.core.block_manager import BlockManager
from flashserve.core.records import RequestRecord, StepRecord
from flashserve.core.request import Request, RequestStatus

logger = logging.getLogger(__name__)

BATCHING_POLICIES = ("continuous", "static")
KV_ALLOCATIONS = ("paged", "contiguous")


@dataclass
class SchedulerConfig:
    """Scheduling limits. Token counts are in tokens, not blocks."""

    num_kv_blocks: int  # blocks in the KV cache
    block_size: int = 16  # token slots per KV block
    max_num_seqs: int = 64  # maximum requests running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill + decode tokens)
    max_model_len: int = 2048  # maximum prompt + output tokens of one request
    batching: str = "continuous"  # "continuous": admit every step; "static": admit a batch only when idle
    kv_allocation: str = "paged"  # "paged": blocks on demand; "contiguous": reserve prompt + max_tokens

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {self.batching!r}")
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"kv_allocation must be one of {KV_ALLOCATIONS}, got {self.kv_allocation!r}")
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_new_tokens) of prompt + output."""

    request: Request
    start: int
    num_new_tokens: int
    is_prefill: bool
    samples: bool  # True when the chunk reaches the last known token, so a new token is sampled

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    step: int
    start_time: float
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    kv_blocks_used: int = 0
    kv_tokens_used: int = 0
    kv_slots_in_use: int = 0  # slots of blocks that hold at least one token

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_prefill_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_seqs(self) -> int:
        return sum(1 for s in self.scheduled if not s.is_prefill)


class Scheduler:
    """Waiting and running queues over one `BlockManager`.

    Each step serves running requests first, oldest first, then admits waiting requests in
    arrival order (FCFS: the head of the queue blocks the rest) while the token budget,
    `max_num_seqs` and free blocks allow. A prompt longer than the remaining budget is split
    into chunks over several steps. When a running request needs a block and none is free, the
    newest running request is preempted by recompute. Its blocks are freed, and it goes back to
    the head of the waiting queue to be prefilled again with its output so far.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.finished: list[Request] = []
        self.step_records: list[StepRecord] = []
        self.num_preemptions = 0
        self._static_batch: set[str] = set()
        self._step = 0

    # admission checks

    def validate(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError if a request with these lengths can never be served."""
        cfg = self.config
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty; a request needs at least 1 prompt token")
        if num_prompt_tokens > cfg.max_model_len:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens, more than max_model_len="
                f"{cfg.max_model_len}; shorten the prompt or raise max_model_len"
            )
        if num_prompt_tokens + max_tokens > cfg.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = "
                f"{num_prompt_tokens + max_tokens} exceeds max_model_len={cfg.max_model_len}; "
                f"lower max_tokens to at most {cfg.max_model_len - num_prompt_tokens}"
            )
        needed = self.block_manager.blocks_for(num_prompt_tokens + max_tokens)
        if needed > cfg.num_kv_blocks:
            raise ValueError(
                f"prompt + max_tokens = {num_prompt_tokens + max_tokens} tokens needs {needed} KV "
                f"blocks of {cfg.block_size} tokens, but the whole cache has {cfg.num_kv_blocks}; "
                f"lower max_tokens or raise num_kv_blocks"
            )

    def add_request(self, request: Request) -> None:
        """Queue `request` after checking it can ever be served (ValueError otherwise)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.validate(request.num_prompt_tokens, request.stop.max_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # one step

    def schedule(self, now: float) -> SchedulerOutput:
        """Choose the tokens of the next step and allocate their KV slots."""
        output = SchedulerOutput(step=self._step, start_time=now)
        budget = self.config.max_num_batched_tokens

        # running requests, oldest first
        running = self.running
        block_manager = self.block_manager
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            target = request.num_computed_tokens + num_new
            # NOTE: can_allocate first only skips a call; _make_room preempts on the same test.
            if not block_manager.can_allocate(request, target) and not self._make_room(request, target, output, now):
                break
            block_manager.allocate(request, target)
            output.scheduled.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1

        # waiting requests, in arrival order; none join in a step that had to preempt
        if not output.preempted:
            self._admit_waiting(output, budget, now)

        self._count_kv(output)
        self._step += 1
        return output

    def _make_room(self, request: Request, num_tokens: int, output: SchedulerOutput, now: float) -> bool:
        """Preempt the newest running requests until `request` can grow; False if it was preempted."""
        while not self.block_manager.can_allocate(request, num_tokens):
            victim = self.running.pop()
            self._preempt(victim, output, now)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, output: SchedulerOutput, budget: int, now: float) -> None:
        cfg = self.config
        if cfg.batching == "static":
            if not self.running and not self._static_batch:
                self._form_static_batch()
            if not self._static_batch:
                return

        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting[0]
            if cfg.batching == "static" and request.request_id not in self._static_batch:
                break

            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if cfg.kv_allocation == "contiguous":
                target = min(request.max_total_tokens, cfg.max_model_len)
            else:
                target = request.num_computed_tokens + num_new
            if not self.block_manager.can_allocate(request, target):
                break
            self.block_manager.allocate(request, target)
            if cfg.kv_allocation == "contiguous":
                request.num_reserved_tokens = target

            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            output.scheduled.append(self._chunk(request, num_new))
            budget -= num_new

    def _form_static_batch(self) -> None:
        """Take the next batch: up to max_num_seqs waiting requests, in order, that fit in the cache together.

        A batch counts the blocks its members' prompts need (prompt + max_tokens under contiguous
        allocation), so it is never larger than the cache can start. Under paged allocation,
        members that grow later may still preempt each other.
        """
        free = self.block_manager.num_free_blocks
        for request in self.waiting:
            if len(self._static_batch) >= self.config.max_num_seqs:
                break
            tokens = request.max_total_tokens if self.config.kv_allocation == "contiguous" else request.num_tokens
            blocks = self.block_manager.blocks_for(tokens)
            if blocks > free:
                break
            free -= blocks
            self._static_batch.add(request.request_id)

    def _chunk(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        num_tokens = request.num_tokens
        samples = start + num_new == num_tokens
        is_decode = num_new == 1 and samples and request.num_output_tokens > 0 and start == num_tokens - 1
        return ScheduledRequest(request, start, num_new, is_prefill=not is_decode, samples=samples)

    def _preempt(self, request: Request, output: SchedulerOutput, now: float) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        output.preempted.append(request.request_id)
        logger.debug("preempted request %s at t=%.4f", request.request_id, now)

    def _count_kv(self, output: SchedulerOutput) -> None:
        block_size = self.config.block_size
        tokens = 0
        slots_in_use = 0
        new_tokens = {s.request.request_id: s.num_new_tokens for s in output.scheduled}
        for request in self.running:
            stored = request.num_computed_tokens + new_tokens.get(request.request_id, 0)
            tokens += stored
            slots_in_use += -(-stored // block_size)  # blocks_for(stored)
        output.kv_blocks_used = self.block_manager.num_used_blocks
        output.kv_tokens_used = tokens
        output.kv_slots_in_use = slots_in_use * block_size

    def update(self, output: SchedulerOutput, sampled: dict[str, int], now: float) -> list[Request]:
        """Apply a finished step: advance KV progress, append sampled tokens, finish requests.

        `sampled` maps the id of each request whose chunk `samples` to its new token. Returns
        the requests that finished in this step.
        """
        finished = []
        for item in output.scheduled:
            request = item.request
            if request.status is RequestStatus.FINISHED:  # aborted while the step ran
                continue
            request.num_computed_tokens = item.start + item.num_new_tokens
            if not item.samples:
                continue
            token_id = sampled[request.request_id]
            request.output_token_ids.append(token_id)
            request.token_times.append(now)
            if request.first_token_time is None:
                request.first_token_time = now
            reason = request.check_stop(token_id)
            if reason is not None:
                self.finish_request(request.request_id, reason, now)
                finished.append(request)

        self._record_step(output, now)
        return finished

    def _record_step(self, output: SchedulerOutput, now: float) -> None:
        block_size = self.config.block_size
        allocated = output.kv_blocks_used * block_size
        prefill_tokens = prefill_seqs = context_tokens = sum_sq = sampled = 0
        for item in output.scheduled:
            num_new = item.num_new_tokens
            context_tokens += item.start + num_new
            if item.is_prefill:
                prefill_tokens += num_new
                prefill_seqs += 1
                sum_sq += num_new * num_new
            if item.samples:
                sampled += 1
        self.step_records.append(StepRecord(
            step=output.step,
            start_time=output.start_time,
            duration=now - output.start_time,
            num_prefill_tokens=prefill_tokens,
            num_decode_seqs=len(output.scheduled) - prefill_seqs,
            num_prefill_seqs=prefill_seqs,
            num_context_tokens=context_tokens,
            sum_sq_prefill_tokens=sum_sq,
            num_sampled=sampled,
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preempted=len(output.preempted),
            kv_blocks_used=output.kv_blocks_used,
            kv_blocks_total=self.config.num_kv_blocks,
            kv_tokens_used=output.kv_tokens_used,
            kv_slots_allocated=allocated,
            kv_slots_reserved=max(0, allocated - output.kv_slots_in_use),
        ))

    # finishing

    def finish_request(self, request_id: str, reason: str, now: float) -> Request | None:
        """Finish a request (stop string, abort, or a token rule) and free its blocks.

        Returns the request, or None when it is unknown or already finished.
        """
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = now
        self._static_batch.discard(request_id)
        self.finished.append(request)
        return request

    def abort_request(self, request_id: str, now: float) -> Request | None:
        return self.finish_request(request_id, "abort", now)

    def request_records(self) -> list[RequestRecord]:
        """Records of every request seen so far, finished or not, in arrival order."""
        return [to_record(request) for request in self.requests.values()]

    # bounded history, for long-running servers

    def pop_finished(self) -> list[Request]:
        """Remove the finished requests from `requests` and `finished` and return them, oldest first.

        A long-running server calls this after every step so that memory stays bounded;
        `request_records()` no longer lists the removed requests.
        """
        finished = list(self.finished)
        self.finished.clear()
        for request in finished:
            self.requests.pop(request.request_id, None)
        return finished

    def pop_step_records(self) -> list[StepRecord]:
        """Remove and return the step records collected so far, oldest first."""
        records = list(self.step_records)
        self.step_records.clear()
        return records


def to_record(request: Request) -> RequestRecord:
    return RequestRecord(
        request_id=request.request_id,
        arrival_time=request.arrival_time,
        first_scheduled_time=request.first_scheduled_time,
        first_token_time=request.first_token_time,
        finish_time=request.finish_time,
        num_prompt_tokens=request.num_prompt_tokens,
        num_output_tokens=request.num_output_tokens,
        num_preemptions=request.num_preemptions,
        finish_reason=request.finish_reason,
        token_times=list(request.token_times),
    )
