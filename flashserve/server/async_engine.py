"""The async engine loop: the only code that touches the LLMEngine while the server runs.

One asyncio task steps the engine, running each blocking `engine.step()` in one dedicated worker
thread so the event loop keeps serving HTTP. Request handlers never call the engine themselves: they hand
a function to the loop (`submit`, `abort`, `stats`), which runs it between two steps, and they
receive their outputs through a `GenerationStream`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from flashserve.core import Scheduler, to_record
from flashserve.core.records import RequestRecord
from flashserve.engine import LLMEngine
from flashserve.outputs import RequestOutput
from flashserve.sampling_params import SamplingParams
from flashserve.server.metrics import ServerMetrics
from flashserve.server.protocol import InvalidRequest

logger = logging.getLogger(__name__)

MAX_STEP_HISTORY = 500  # step records kept for /v1/stats
MAX_REQUEST_HISTORY = 200  # finished-request summaries kept for /v1/stats


class EngineUnavailable(RuntimeError):
    """The engine loop has stopped or failed, so the server returns 503."""


@dataclass
class SubmitItem:
    """One engine request to add: a prompt (text or token ids) and its sampling parameters."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    stream: bool = False  # detokenize every step, for streaming responses
    add_special_tokens: bool = True  # text prompts only: let the tokenizer add BOS and the like
    fill_max_tokens: bool = False  # replace params.max_tokens by the context left after the prompt


class GenerationStream:
    """Outputs of the engine requests of one HTTP request, in the order the engine produced them."""

    def __init__(self, request_ids: list[str]):
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.unfinished = set(request_ids)

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def batches(self) -> AsyncIterator[list[RequestOutput]]:
        """Yield the outputs queued so far, waiting for at least one, until every request finished.

        A handler that falls behind the engine gets several outputs at once and can send them as
        one chunk. Raises the error the engine loop put into the stream, if any.
        """
        while self.unfinished:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self.unfinished.discard(item.request_id)
            yield batch


def kv_fragmentation(scheduler: Scheduler) -> float:
    """1 - tokens stored / token slots allocated, over the blocks in use now (0 when none are)."""
    block_manager = scheduler.block_manager
    allocated = block_manager.num_used_blocks * block_manager.block_size
    if allocated == 0:
        return 0.0
    stored = sum(request.num_computed_tokens for request in scheduler.running)
    return max(0.0, 1.0 - stored / allocated)


def summarize(record: RequestRecord) -> dict[str, Any]:
    """Summarize a finished request as /v1/stats lists it, with latencies in seconds."""
    ttft = None if record.first_token_time is None else record.first_token_time - record.arrival_time
    e2e = None if record.finish_time is None else record.finish_time - record.arrival_time
    return {
        "request_id": record.request_id,
        "ttft": ttft,
        "itl": [b - a for a, b in zip(record.token_times, record.token_times[1:])],
        "e2e": e2e,
        "num_output_tokens": record.num_output_tokens,
        "finish_reason": record.finish_reason,
    }


class AsyncEngine:
    """Steps an LLMEngine in the background and routes its outputs to request handlers.

    Memory stays bounded: finished requests leave the scheduler's tables after every step,
    and only the last MAX_STEP_HISTORY steps and MAX_REQUEST_HISTORY finished requests are kept.
    """

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.steps: collections.deque[dict] = collections.deque(maxlen=MAX_STEP_HISTORY)
        self.finished_requests: collections.deque[dict] = collections.deque(maxlen=MAX_REQUEST_HISTORY)
        self.last_step = -1
        self.output_tokens_total = 0
        self.started_at = time.monotonic()
        self._commands: list[tuple[Callable[[LLMEngine], Any], asyncio.Future | None]] = []
        self._streams: dict[str, GenerationStream] = {}
        self._num_preemptions_seen = engine.scheduler.num_preemptions
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False

    # lifecycle

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashserve-engine")
        self._task = asyncio.create_task(self._run(), name="flashserve-engine-loop")

    async def stop(self) -> None:
        """Finish the running step, abort every unfinished request and end the loop."""
        if self._task is None:
            return
        self._stopping = True
        self._wakeup.set()
        await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._abort_all(EngineUnavailable("the server is shutting down"))

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    # handler-facing API

    async def submit(self, items: list[SubmitItem]) -> tuple[GenerationStream, list[list[int]]]:
        """Add the requests of one HTTP request, all or none.

        Returns their output stream and each prompt's token ids. Raises InvalidRequest, naming
        the prompt, if any request can never be served; then nothing is queued.
        """
        if not self.is_running:
            raise EngineUnavailable("the engine loop is not running")
        arrival_time = self.engine.now()
        stream = GenerationStream([item.request_id for item in items])

        def add(engine: LLMEngine) -> list[list[int]]:
            prepared = []
            for index, item in enumerate(items):
                try:
                    prepared.append(self._prepare(engine, item))
                except ValueError as error:
                    prefix = f"prompt {index}: " if len(items) > 1 else ""
                    raise InvalidRequest(f"{prefix}{error}") from None
            for item, (prompt_token_ids, params) in zip(items, prepared):
                engine.add_request(item.request_id, prompt_token_ids, params, arrival_time, stream=item.stream)
                self._streams[item.request_id] = stream
            return [prompt_token_ids for prompt_token_ids, _ in prepared]

        try:
            prompt_token_ids = await self._call(add)
        except asyncio.CancelledError:
            self.abort([item.request_id for item in items])
            raise
        return stream, prompt_token_ids

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (client gone) and free their KV blocks, at the loop's next turn."""
        if not request_ids or not self.is_running:
            return

        def abort(engine: LLMEngine) -> None:
            for request_id in request_ids:
                self._streams.pop(request_id, None)
                if engine.abort_request(request_id):
                    logger.info("aborted request %s", request_id)
                engine.release(request_id)

        self._commands.append((abort, None))
        self._wakeup.set()

    async def stats(self, since_step: int) -> dict[str, Any]:
        """Return the /v1/stats body: live queue and KV cache state, plus the steps after `since_step`."""
        return await self._call(lambda engine: self._stats(since_step))

    # the loop

    async def _call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """Run `function(engine)` between two steps and return its result."""
        if not self.is_running:
            return function(self.engine)
        future = asyncio.get_running_loop().create_future()
        self._commands.append((function, future))
        self._wakeup.set()
        return await future

    def _run_commands(self) -> None:
        commands, self._commands = self._commands, []
        for function, future in commands:
            try:
                result = function(self.engine)
            except Exception as error:  # the caller turns it into the HTTP response
                if future is None:
                    logger.exception("engine command failed")
                elif not future.done():
                    future.set_exception(error)
                continue
            if future is not None and not future.done():
                future.set_result(result)

    def _fail_pending_commands(self) -> None:
        """Run the queued aborts and fail the queued calls, once the loop has ended."""
        commands, self._commands = self._commands, []
        for function, future in commands:
            if future is None:
                function(self.engine)
            elif not future.done():
                future.set_exception(EngineUnavailable("the server is shutting down"))

    async def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._run_commands()
                self._collect()
                if not engine.has_unfinished_requests():
                    if not self._commands and not self._stopping:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue

                try:
                    outputs = await asyncio.get_running_loop().run_in_executor(self._executor, engine.step)
                except Exception as error:
                    # NOTE: the step's scheduler state may be half-updated, so every unfinished
                    # request is aborted. The engine then serves new requests from a clean cache.
                    logger.exception("engine step failed; aborting %d unfinished requests",
                                     engine.get_num_unfinished_requests())
                    self._abort_all(EngineUnavailable(f"the engine step failed: {error}"))
                    continue
                self._dispatch(outputs)
                self._collect()  # so that commands of the next turn see this step
        except Exception:
            logger.exception("the engine loop failed; the server can no longer generate")
            self._abort_all(EngineUnavailable("the engine loop failed"))
            raise
        finally:
            self._fail_pending_commands()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            num_new = len(output.new_token_ids)
            self.output_tokens_total += num_new
            self.metrics.generation_tokens.inc(num_new)
            if num_new and len(output.outputs[0].token_ids) == num_new:
                self.metrics.prompt_tokens.inc(len(output.prompt_token_ids))

            if output.finished:
                self.engine.release(output.request_id)
                stream = self._streams.pop(output.request_id, None)
            else:
                stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)

    def _collect(self) -> None:
        """Move finished requests and new steps out of the scheduler into the bounded history."""
        scheduler = self.engine.scheduler
        for request in scheduler.pop_finished():
            record = to_record(request)
            self.metrics.observe_finished(record)
            self.finished_requests.append(summarize(record))
        for step in scheduler.pop_step_records():
            self.steps.append(step.to_dict())
            self.last_step = step.step
        self._update_gauges()

    def _update_gauges(self) -> None:
        scheduler = self.engine.scheduler
        block_manager = scheduler.block_manager
        metrics = self.metrics
        metrics.num_requests_running.set(len(scheduler.running))
        metrics.num_requests_waiting.set(len(scheduler.waiting))
        metrics.kv_cache_usage_perc.set(block_manager.num_used_blocks / block_manager.num_blocks)
        metrics.kv_cache_fragmentation.set(kv_fragmentation(scheduler))
        new_preemptions = scheduler.num_preemptions - self._num_preemptions_seen
        if new_preemptions > 0:
            metrics.num_preemptions.inc(new_preemptions)
        self._num_preemptions_seen = scheduler.num_preemptions

    def _abort_all(self, error: BaseException) -> None:
        """Abort every unfinished request and end its stream with `error`. Call it only between steps."""
        engine = self.engine
        scheduler = engine.scheduler
        request_ids = [r.request_id for r in scheduler.running] + [r.request_id for r in scheduler.waiting]
        for request_id in request_ids:
            engine.abort_request(request_id)
            engine.release(request_id)
        streams = {id(stream): stream for stream in self._streams.values()}
        self._streams.clear()
        for stream in streams.values():
            stream.put(error)
        self._collect()

    def _prepare(self, engine: LLMEngine, item: SubmitItem) -> tuple[list[int], SamplingParams]:
        """Tokenize and check one request (ValueError if it can never be served)."""
        if isinstance(item.prompt, str):
            if not item.prompt:
                raise ValueError("the prompt is empty; send at least one character or token id")
            prompt_token_ids = engine.tokenizer.encode(item.prompt, add_special_tokens=item.add_special_tokens)
        else:
            prompt_token_ids = engine.tokenize(item.prompt)

        params = item.params
        if item.fill_max_tokens:
            params = replace(params, max_tokens=max(1, self.max_context_tokens - len(prompt_token_ids)))
        engine.check_request(prompt_token_ids, params)
        return prompt_token_ids, params

    @property
    def max_context_tokens(self) -> int:
        """Maximum prompt + output tokens of one request: max_model_len, or the whole KV cache if smaller."""
        config = self.engine.scheduler.config
        return min(config.max_model_len, config.num_kv_blocks * config.block_size)

    def _stats(self, since_step: int) -> dict[str, Any]:
        scheduler = self.engine.scheduler
        block_manager = scheduler.block_manager
        if since_step > self.last_step:
            since_step = -1  # a cursor from another server run: send the whole history again
        steps = [step for step in self.steps if step["step"] > since_step]
        return {
            "model": self.metrics.model_name,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "num_preemptions": scheduler.num_preemptions,
            "kv_blocks_total": block_manager.num_blocks,
            "kv_blocks_used": block_manager.num_used_blocks,
            "kv_cache_usage_perc": block_manager.num_used_blocks / block_manager.num_blocks,
            "kv_fragmentation": kv_fragmentation(scheduler),
            "block_size": block_manager.block_size,
            "block_owners": block_manager.block_owners(),
            "steps": steps,
            "next_step": self.last_step,
            "recent_requests": list(self.finished_requests),
            "output_tokens_total": self.output_tokens_total,
            "uptime_s": time.monotonic() - self.started_at,
        }
