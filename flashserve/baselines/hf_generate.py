"""Baseline: Hugging Face `model.generate()` in static batches.

Requests are served first come, first served in batches of up to `batch_size`: a batch starts
when the previous one has finished and takes every request that has arrived by then (or waits
for the next arrival). Prompts are left-padded, every member decodes until the longest output
of the batch is done, and each request keeps only its own `output_len` tokens. This is the
head-of-line blocking that iteration-level scheduling removes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from flashserve.core.records import RequestRecord, StepRecord

logger = logging.getLogger(__name__)


@dataclass
class BaselineRequest:
    request_id: str
    arrival_time: float  # seconds from the start of the run
    prompt_token_ids: list[int]
    output_len: int  # useful output tokens


class _StepClock(StoppingCriteria):
    """Records the wall time at which each generation step finishes; never stops generation."""

    def __init__(self, clock):
        self.clock = clock
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_hf_generate(
    model,
    requests: list[BaselineRequest],
    batch_size: int,
    pad_token_id: int = 0,
    clock=None,
    sleep=time.sleep,
    progress=None,
) -> tuple[list[RequestRecord], list[StepRecord]]:
    """Serve `requests` (sorted by arrival) with static `generate()` batches; returns the shared records.

    `clock()` returns seconds since the start of the run; arrivals in the future are waited for.
    Step records count the padded KV cache of the batch: every member stores the padded prompt
    length plus the steps so far, so `kv_slots_allocated - kv_tokens_used` is padding waste.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if clock is None:
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731

    device = next(model.parameters()).device
    pending = sorted(requests, key=lambda r: r.arrival_time)
    request_records: list[RequestRecord] = []
    step_records: list[StepRecord] = []
    step_index = 0
    position = 0

    while position < len(pending):
        now = clock()
        if pending[position].arrival_time > now:
            sleep(pending[position].arrival_time - now)
            now = clock()
        batch = []
        while position < len(pending) and len(batch) < batch_size and pending[position].arrival_time <= now:
            batch.append(pending[position])
            position += 1

        max_prompt = max(len(r.prompt_token_ids) for r in batch)
        max_new = max(r.output_len for r in batch)
        input_ids = torch.full((len(batch), max_prompt), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), max_prompt), dtype=torch.long)
        for row, request in enumerate(batch):
            ids = request.prompt_token_ids
            input_ids[row, max_prompt - len(ids):] = torch.tensor(ids)
            attention_mask[row, max_prompt - len(ids):] = 1

        step_clock = _StepClock(clock)
        batch_start = clock()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new,
                min_new_tokens=max_new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad_token_id,
                stopping_criteria=StoppingCriteriaList([step_clock]),
            )
        times = step_clock.times

        for request in batch:
            token_times = times[:request.output_len]
            request_records.append(RequestRecord(
                request_id=request.request_id,
                arrival_time=request.arrival_time,
                first_scheduled_time=batch_start,
                first_token_time=token_times[0],
                finish_time=token_times[-1],
                num_prompt_tokens=len(request.prompt_token_ids),
                num_output_tokens=request.output_len,
                num_preemptions=0,
                finish_reason="length",
                token_times=list(token_times),
            ))

        previous = batch_start
        prompt_tokens = sum(len(r.prompt_token_ids) for r in batch)
        for step, finished_at in enumerate(times):
            slots = len(batch) * (max_prompt + step + 1)
            stored = prompt_tokens + len(batch) * (step + 1)
            is_prefill = step == 0
            step_records.append(StepRecord(
                step=step_index,
                start_time=previous,
                duration=finished_at - previous,
                num_prefill_tokens=len(batch) * max_prompt if is_prefill else 0,
                num_decode_seqs=0 if is_prefill else len(batch),
                num_prefill_seqs=len(batch) if is_prefill else 0,
                num_context_tokens=len(batch) * (max_prompt + step),
                sum_sq_prefill_tokens=len(batch) * max_prompt**2 if is_prefill else 0,
                num_sampled=len(batch),
                num_running=len(batch),
                num_waiting=sum(1 for r in pending[position:] if r.arrival_time <= finished_at),
                num_preempted=0,
                kv_blocks_used=slots,
                kv_blocks_total=slots,
                kv_tokens_used=stored,
                kv_slots_allocated=slots,
                kv_slots_reserved=0,
            ))
            previous = finished_at
            step_index += 1
        if progress is not None:
            progress.update(len(batch))
    return request_records, step_records
