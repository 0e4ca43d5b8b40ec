"""HTTP load generator: replays requests against any OpenAI-compatible server.

Each request is a streaming POST /v1/completions with a token-id prompt of `prompt_len` tokens,
`max_tokens=output_len`, `temperature=0`, `ignore_eos=true` (vLLM's extension; a server that
ignores it may stop early at EOS) and `stream_options.include_usage`, sent at its arrival time. The client records
one RequestRecord per request in the project's common schema, timing each streamed chunk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from flashserve.core.records import RequestRecord

logger = logging.getLogger(__name__)

PROMPT_TOKEN_RANGE = (3, 200)  # default prompt ids: past the usual special ids 0-2, inside any byte-level vocabulary


class ReplayRecords(list):
    """RequestRecords of the measured requests, in input order, plus the measured window.

    Times are seconds since the window start, when the first measured request was due.
    `start_time` is 0.0 and `end_time` is when the last measured request ended.
    """

    def __init__(self, records: list[RequestRecord], start_time: float, end_time: float):
        super().__init__(records)
        self.start_time = start_time
        self.end_time = end_time

    @property
    def num_errors(self) -> int:
        return sum(1 for record in self if record.finish_reason == "error")


def default_prompt_token_ids(request: Any, seed: int = 0) -> list[int]:
    """Deterministic prompt ids of one request, in PROMPT_TOKEN_RANGE, from its id and the seed."""
    rng = random.Random(f"{seed}:{request.request_id}")
    low, high = PROMPT_TOKEN_RANGE
    return [rng.randint(low, high) for _ in range(request.prompt_len)]


def completions_url(base_url: str) -> str:
    """Return the completions endpoint under `base_url`, given with or without the trailing /v1."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/completions"


class RequestFailed(Exception):
    """The server returned an error status, an error chunk, or a stream that ended early."""


async def _send(client: httpx.AsyncClient, url: str, payload: dict, record: RequestRecord,
                clock: Callable[[], float], timeout_s: float) -> RequestRecord:
    """Send one streaming request and fill `record` from its chunks; a failure sets finish_reason "error"."""
    try:
        usage, num_chunks = await asyncio.wait_for(_stream(client, url, payload, record, clock), timeout_s)
    except asyncio.TimeoutError:
        _fail(record, f"timed out after {timeout_s} s", clock())
        return record
    except (httpx.HTTPError, RequestFailed, json.JSONDecodeError, OSError) as error:
        _fail(record, f"{type(error).__name__}: {error}", clock())
        return record

    record.finish_time = clock()
    if usage is not None:
        record.num_prompt_tokens = int(usage.get("prompt_tokens", record.num_prompt_tokens))
        record.num_output_tokens = int(usage.get("completion_tokens", num_chunks))
    else:
        record.num_output_tokens = num_chunks
    return record


async def _stream(client: httpx.AsyncClient, url: str, payload: dict, record: RequestRecord,
                  clock: Callable[[], float]) -> tuple[dict | None, int]:
    """Read the SSE stream into `record`; return the usage (None if the server sent none) and
    the number of chunks that carried a token."""
    usage = None
    num_chunks = 0
    async with client.stream("POST", url, json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            raise RequestFailed(f"HTTP {response.status_code}: {_error_message(response.text)}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            now = clock()
            chunk = json.loads(data)
            if "error" in chunk:
                raise RequestFailed(f"error chunk: {_error_message(data)}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                finish_reason = choice.get("finish_reason")
                # a chunk without text that only announces the end carries no token
                if choice.get("text") or not finish_reason:
                    record.token_times.append(now)
                    if record.first_token_time is None:
                        record.first_token_time = now
                    num_chunks += 1
                if finish_reason:
                    record.finish_reason = finish_reason
        else:
            raise RequestFailed("the stream ended without data: [DONE]")
    if record.finish_reason is None:
        raise RequestFailed("the stream ended without a finish_reason")
    return usage, num_chunks


def _fail(record: RequestRecord, message: str, now: float) -> None:
    record.finish_reason = "error"
    record.error = message
    record.finish_time = now
    logger.warning("request %s failed: %s", record.request_id, message)


def _error_message(text: str) -> str:
    """Extract `error.message` from an OpenAI error body, or return the start of the raw text."""
    try:
        body = json.loads(text)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text.strip()[:500]


async def replay_http(
    base_url: str,
    model: str,
    requests: Sequence[Any],
    *,
    warmup: int = 0,
    timeout_s: float,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    seed: int = 0,
    prompt_token_ids: Callable[[Any], list[int]] | None = None,
) -> ReplayRecords:
    """Replay `requests` against the server at `base_url` and return the measured records.

    Each request needs `request_id`, `arrival_time` (seconds from the start), `prompt_len` and
    `output_len` (tokens). The first `warmup` requests are sent first, all at once, and left out
    of the result. The rest are sent at their arrival times, shifted so that the first one is
    due at 0.0. `max_concurrency` caps the requests in flight (a request then waits for a slot
    and its `arrival_time` is when it was sent). `timeout_s` bounds each request. A failed
    request is returned with finish_reason "error" and `error` set, never dropped.
    `prompt_token_ids(request)` gives the prompt ids; the default draws them from the seed.
    """
    if warmup < 0 or warmup > len(requests):
        raise ValueError(f"warmup must be between 0 and the {len(requests)} requests, got {warmup}")
    url = completions_url(base_url)
    make_ids = prompt_token_ids or (lambda request: default_prompt_token_ids(request, seed))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(timeout_s)

    def payload(request: Any) -> dict:
        return {
            "model": model,
            "prompt": make_ids(request),
            "max_tokens": request.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        async def run(request: Any, body: dict) -> RequestRecord:
            if slots is None:
                return await _send(client, url, body, _new_record(request, clock()), clock, timeout_s)
            async with slots:
                return await _send(client, url, body, _new_record(request, clock()), clock, timeout_s)

        # warm-up
        warm = [run(request, payload(request)) for request in requests[:warmup]]
        if warm:
            warm_records = await asyncio.gather(*warm)
            failed = sum(1 for record in warm_records if record.finish_reason == "error")
            logger.info("warm-up: %d requests, %d failed", len(warm_records), failed)

        # measured window
        measured = list(requests[warmup:])
        bodies = [payload(request) for request in measured]  # built before the clock starts
        offset = min((request.arrival_time for request in measured), default=0.0)
        t0 = time.perf_counter()
        tasks = []
        for request, body in zip(measured, bodies):
            delay = request.arrival_time - offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run(request, body)))
        records = list(await asyncio.gather(*tasks))

    end_time = max((record.finish_time for record in records if record.finish_time is not None), default=0.0)
    num_errors = sum(1 for record in records if record.finish_reason == "error")
    logger.info("replayed %d requests against %s in %.2f s, %d failed", len(records), url, end_time, num_errors)
    return ReplayRecords(records, 0.0, end_time)


def _new_record(request: Any, now: float) -> RequestRecord:
    return RequestRecord(
        request_id=str(request.request_id),
        arrival_time=now,
        first_scheduled_time=None,  # not visible over HTTP
        first_token_time=None,
        finish_time=None,
        num_prompt_tokens=int(request.prompt_len),
        num_output_tokens=0,
        num_preemptions=0,  # not visible over HTTP
        finish_reason=None,
    )


def replay_http_sync(base_url: str, model: str, requests: Sequence[Any], **options) -> ReplayRecords:
    """replay_http() for synchronous callers; takes the same keyword options."""
    return asyncio.run(replay_http(base_url, model, requests, **options))
