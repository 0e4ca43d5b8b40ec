"""A small server with the HTTP surface the dashboard uses, for the dashboard's tests.

It serves GET /health, GET /v1/models, GET /v1/stats and POST /v1/chat/completions (streaming or
not) like `flashserve serve`. In place of a neural network it steps the real
`flashserve.core.Scheduler` with a word-level echo model. Each word is one token, and the reply is
"You said:" followed by the last user message. With `ignore_eos` the reply repeats until `max_tokens`, which keeps KV
blocks in use for as long as a test needs. It starts in a second or less and needs no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections import deque

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from flashserve.core import Request as CoreRequest
from flashserve.core import Scheduler, SchedulerConfig, StopCriteria

MODEL_NAME = "fake-echo"
EOS_TOKEN_ID = 0


class EchoEngine:
    """The core scheduler stepped every `step_s` seconds; each sampled token is the next word of a planned reply."""

    def __init__(self, num_kv_blocks: int = 64, block_size: int = 4, step_s: float = 0.02):
        self.scheduler = Scheduler(SchedulerConfig(num_kv_blocks=num_kv_blocks, block_size=block_size,
                                                   max_num_seqs=16, max_model_len=num_kv_blocks * block_size))
        self.step_s = step_s
        self.words = ["<eos>"]
        self.word_ids = {"<eos>": EOS_TOKEN_ID}
        self.replies: dict[str, list[int]] = {}
        self.queues: dict[str, asyncio.Queue] = {}
        self.finished: deque[dict] = deque(maxlen=200)
        self.output_tokens_total = 0
        self.started_at = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def token_ids(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.word_ids:
                self.word_ids[word] = len(self.words)
                self.words.append(word)
            ids.append(self.word_ids[word])
        return ids

    def add(self, messages: list[dict], max_tokens: int, ignore_eos: bool) -> tuple[str, asyncio.Queue]:
        prompt = " ".join(str(m.get("content", "")) for m in messages)
        last_user = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
        reply = self.token_ids("You said: " + last_user)
        if ignore_eos:
            reply = (reply * (max_tokens // max(len(reply), 1) + 1))[:max_tokens]
        request_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
        stop = StopCriteria(max_tokens=max_tokens, eos_token_id=EOS_TOKEN_ID, ignore_eos=ignore_eos)
        try:
            self.scheduler.add_request(CoreRequest(request_id, self.token_ids(prompt) or [EOS_TOKEN_ID], stop,
                                                   self.now()))
        except ValueError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        self.replies[request_id] = reply
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        return request_id, queue

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            if not self.scheduler.has_unfinished():
                continue
            output = self.scheduler.schedule(self.now())
            if output.is_empty:
                continue
            sampled = {}
            for item in output.scheduled:
                if item.samples:
                    reply = self.replies[item.request.request_id]
                    index = item.request.num_output_tokens
                    sampled[item.request.request_id] = reply[index] if index < len(reply) else EOS_TOKEN_ID
            finished = self.scheduler.update(output, sampled, self.now())
            self.output_tokens_total += len(sampled)
            for request_id, token_id in sampled.items():
                if token_id != EOS_TOKEN_ID:
                    self.queues[request_id].put_nowait(self.words[token_id])
            for request in finished:
                self.queues.pop(request.request_id).put_nowait(None)
                self.replies.pop(request.request_id)
                times = request.token_times
                self.finished.append({
                    "request_id": request.request_id,
                    "ttft": request.first_token_time - request.arrival_time,
                    "itl": [b - a for a, b in zip(times, times[1:])],
                    "e2e": request.finish_time - request.arrival_time,
                    "num_output_tokens": request.num_output_tokens,
                    "finish_reason": request.finish_reason,
                })
            # Keep only the records the stats endpoint serves, as a long-running server does.
            self.scheduler.finished.clear()
            for request in finished:
                self.scheduler.requests.pop(request.request_id, None)
            del self.scheduler.step_records[:-500]

    def stats(self, since_step: int) -> dict:
        scheduler = self.scheduler
        blocks = scheduler.block_manager
        records = scheduler.step_records
        last_step = records[-1].step if records else -1
        if since_step > last_step:
            since_step = -1
        allocated = blocks.num_used_blocks * blocks.block_size
        stored = sum(r.num_computed_tokens for r in scheduler.running)
        return {
            "model": MODEL_NAME,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "num_preemptions": scheduler.num_preemptions,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_used_blocks,
            "kv_cache_usage_perc": blocks.num_used_blocks / blocks.num_blocks,
            "kv_fragmentation": 1.0 - stored / allocated if allocated else 0.0,
            "block_size": blocks.block_size,
            "block_owners": blocks.block_owners(),
            "steps": [r.to_dict() for r in records if r.step > since_step],
            "next_step": last_step,
            "recent_requests": list(self.finished),
            "output_tokens_total": self.output_tokens_total,
            "uptime_s": self.now(),
        }


def create_app(engine: EchoEngine | None = None) -> FastAPI:
    engine = engine or EchoEngine()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)
    app.state.engine = engine

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "tests"}]}

    @app.get("/v1/stats")
    async def stats(since_step: int = -1) -> dict:
        return engine.stats(since_step)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        max_tokens = int(body.get("max_tokens") or 16)
        request_id, queue = engine.add(body.get("messages", []), max_tokens, bool(body.get("ignore_eos")))
        if not body.get("stream"):
            words = []
            while (word := await queue.get()) is not None:
                words.append(word)
            return {"id": request_id, "object": "chat.completion", "model": MODEL_NAME,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                 "finish_reason": "stop"}]}

        async def events():
            def chunk(delta: dict, finish_reason: str | None = None) -> str:
                body = {"id": request_id, "object": "chat.completion.chunk", "model": MODEL_NAME,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
                return f"data: {json.dumps(body)}\n\n"

            yield chunk({"role": "assistant"})
            first = True
            while (word := await queue.get()) is not None:
                yield chunk({"content": word if first else " " + word})
                first = False
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """Runs an ASGI app under uvicorn on 127.0.0.1 in a daemon thread; use as a context manager."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the dashboard's fake server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port)
