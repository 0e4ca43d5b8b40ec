"""Runners: replay one workload through the engine, the HF generate() baseline or a server.

Every runner returns the shared request and step records (flashserve.core.records) with times
in seconds since the replay started, so that arrival times equal the workload's. Every system
of a run gets the same arrivals, lengths and prompt token ids (common random numbers).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from pathlib import Path

import torch

from experiments.workloads import RequestSpec
from flashserve.config import EngineConfig
from flashserve.core.records import RequestRecord, StepRecord
from flashserve.engine import LLMEngine
from flashserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WARMUP_OUTPUT_TOKENS = 8


def sampling_params(spec: RequestSpec) -> SamplingParams:
    """Greedy decoding of exactly `spec.output_len` tokens, as in vLLM's serving benchmark.

    NOTE: max_tokens equals the request's true output length, so contiguous allocation reserves
    exactly what a request will use (an oracle of the output length). Real clients send a larger
    max_tokens, which makes reservation waste larger than measured here.
    """
    return SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)


def engine_config(cfg, model_file: Path, batching: str, kv_allocation: str) -> EngineConfig:
    """Build the EngineConfig of a measured system from the run config's `engine` and `model` sections."""
    engine = cfg.engine
    return EngineConfig(
        model=str(model_file),
        block_size=engine.block_size,
        num_kv_blocks=engine.num_kv_blocks,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        batching=batching,
        kv_allocation=kv_allocation,
        device=engine.device,
        dtype=engine.dtype,
        seed=cfg.seed,
        load_format=cfg.model.get("load_format", "auto"),
    )


def warm_up_engine(engine: LLMEngine, num_requests: int) -> None:
    """Serve `num_requests` short requests of growing prompt length, then drop their records.

    The first forward passes of a fresh process pay for memory allocation and kernel selection;
    warming up keeps that cost out of the measured latencies.
    """
    if num_requests < 1:
        return
    longest = max(1, min(256, engine.max_model_len - WARMUP_OUTPUT_TOKENS))
    for i in range(num_requests):
        prompt_len = max(1, longest * (i + 1) // num_requests)
        prompt = [3 + (i + j) % 200 for j in range(prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=WARMUP_OUTPUT_TOKENS, ignore_eos=True)
        engine.add_request(f"warmup-{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    engine.reset_records()


def replay_engine(
    engine: LLMEngine,
    requests: list[RequestSpec],
    prompt_ids: dict[str, list[int]],
    progress=None,
) -> tuple[list[RequestRecord], list[StepRecord]]:
    """Replay `requests` in real time: each is added when its arrival time has passed.

    Requests that arrive while a step runs join at the next step, with their true arrival time.
    """
    engine.reset_records()
    pending = deque(sorted(requests, key=lambda r: r.arrival_time))
    start = engine.now()

    while pending or engine.has_unfinished_requests():
        elapsed = engine.now() - start
        while pending and pending[0].arrival_time <= elapsed:
            spec = pending.popleft()
            engine.add_request(spec.request_id, prompt_ids[spec.request_id], sampling_params(spec),
                               arrival_time=start + spec.arrival_time)
        if engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    engine.release(output.request_id)
                    if progress is not None:
                        progress.update(1)
        elif pending:
            time.sleep(max(0.0, pending[0].arrival_time - (engine.now() - start)))

    return shift_requests(engine.request_records(), start), shift_steps(engine.step_records(), start)


def shift_requests(records: list[RequestRecord], origin: float) -> list[RequestRecord]:
    """Records with every time moved to seconds since `origin`."""
    def moved(t):
        return None if t is None else t - origin

    return [
        dataclasses.replace(
            r,
            arrival_time=r.arrival_time - origin,
            first_scheduled_time=moved(r.first_scheduled_time),
            first_token_time=moved(r.first_token_time),
            finish_time=moved(r.finish_time),
            token_times=[t - origin for t in r.token_times],
        )
        for r in records
    ]


def shift_steps(records: list[StepRecord], origin: float) -> list[StepRecord]:
    return [dataclasses.replace(r, start_time=r.start_time - origin) for r in records]


def run_measured(cfg, system, model_file: Path, requests, prompt_ids, progress=None):
    """Build an engine with the system's batching and KV allocation, warm it up and replay."""
    engine = LLMEngine(engine_config(cfg, model_file, system.batching, system.kv_allocation))
    warm_up_engine(engine, cfg.engine.warmup_requests)
    return replay_engine(engine, requests, prompt_ids, progress)


def run_hf_baseline(cfg, model_file: Path, requests, prompt_ids, progress=None):
    """Serve the workload with Hugging Face generate() in static batches (see flashserve.baselines)."""
    from flashserve.baselines.hf_generate import BaselineRequest, run_hf_generate
    from flashserve.model import loader
    from flashserve.model.runner import resolve_device, resolve_dtype

    device = resolve_device(cfg.engine.device)
    dtype = resolve_dtype(cfg.engine.dtype, device)
    source = loader.resolve_model(str(model_file))
    model, _ = loader.build_model(source, cfg.model.get("load_format", "auto"), dtype, device, cfg.seed, "sdpa")
    pad_token_id = source.hf_config.get("pad_token_id")
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    batch_size = cfg.baseline.batch_size or cfg.engine.max_num_seqs

    # warm-up: one small batch, not recorded
    warmup = [BaselineRequest(f"warmup-{i}", 0.0, [3 + j % 200 for j in range(16 * (i + 1))], WARMUP_OUTPUT_TOKENS)
              for i in range(2)]
    run_hf_generate(model, warmup, batch_size=2, pad_token_id=pad_token_id)

    baseline_requests = [
        BaselineRequest(spec.request_id, spec.arrival_time, prompt_ids[spec.request_id], spec.output_len)
        for spec in requests
    ]
    with torch.inference_mode():
        return run_hf_generate(model, baseline_requests, batch_size, pad_token_id=pad_token_id, progress=progress)


def run_predicted(cfg, system, cost_model, requests, progress=None):
    """Simulate the workload under the system's batching and KV allocation with the run's cost model."""
    from flashserve.core import SchedulerConfig
    from sim import simulate

    engine = cfg.engine
    scheduler_config = SchedulerConfig(
        num_kv_blocks=engine.num_kv_blocks,
        block_size=engine.block_size,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len,
        batching=system.batching,
        kv_allocation=system.kv_allocation,
    )
    result = simulate(list(requests), scheduler_config, cost_model)
    if progress is not None:
        progress.update(len(result.request_records))
    return result.request_records, result.step_records


def run_http(cfg, requests, prompt_ids, progress=None):
    """Replay the workload against the OpenAI-compatible server at http.base_url.

    The server's own scheduler is invisible from outside, so only request records come back.
    """
    from experiments.http_client import replay_http_sync

    http = cfg.http
    records = replay_http_sync(
        http.base_url,
        http.model or cfg.model.name,
        list(requests),
        timeout_s=http.timeout_s,
        max_concurrency=http.max_concurrency,
        api_key=http.api_key,
        seed=cfg.seed,
        prompt_token_ids=lambda spec: prompt_ids[spec.request_id],
    )
    if progress is not None:
        progress.update(len(records))
    return list(records), []
