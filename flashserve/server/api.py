"""The FastAPI app: OpenAI-compatible routes, /health, /metrics and /v1/stats.

Every client mistake gets 400 (404 for an unknown model) and OpenAI's error body
{"error": {"message", "type", "param", "code"}}; only server faults get a 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashserve.engine import LLMEngine
from flashserve.server.async_engine import AsyncEngine, EngineUnavailable
from flashserve.server.metrics import ServerMetrics
from flashserve.server.protocol import ChatCompletionRequest, CompletionRequest, InvalidRequest, error_body
from flashserve.server.serving import OpenAIServing

logger = logging.getLogger(__name__)


def build_app(engine: LLMEngine, served_model_names: list[str] | None = None) -> FastAPI:
    """Build the app around a ready engine; the engine loop starts and stops with the app's lifespan.

    `served_model_names` are the names a request may send as `model` (default: the engine's
    `model` option); the first one labels the metrics.
    """
    names = list(served_model_names or [engine.config.model])
    metrics = ServerMetrics(names[0])
    async_engine = AsyncEngine(engine, metrics)
    serving = OpenAIServing(async_engine, names)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await async_engine.start()
        logger.info(
            "server started: model=%s served as %s, device=%s, dtype=%s, kv_blocks=%d x %d tokens, max_model_len=%d",
            engine.source.name, names, engine.device, str(engine.dtype).removeprefix("torch."), engine.num_kv_blocks,
            engine.config.block_size, engine.max_model_len,
        )
        try:
            yield
        finally:
            await async_engine.stop()
            logger.info("server stopped after %.1f s; %d output tokens served", time.monotonic() -
                        async_engine.started_at, async_engine.output_tokens_total)

    app = FastAPI(title="Flash-Serve", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return JSONResponse(error_body("the engine loop is not running", type="server_error"), status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "flashserve",
                 "root": engine.config.model, "max_model_len": engine.max_model_len} for name in names]
        return {"object": "list", "data": data}

    @app.get("/v1/stats")
    async def stats(since_step: int = Query(-1, description="return steps with a larger step number")) -> dict:
        return await async_engine.stats(since_step)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await _cancel_on_disconnect(request, serving.create_completion(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await _cancel_on_disconnect(request, serving.create_chat_completion(body))

    return app


async def _cancel_on_disconnect(request: Request, handler):
    """Run `handler`, cancelling it if the client disconnects first (its cleanup aborts the requests).

    A streaming response returns at once, and Starlette then cancels the stream itself on a disconnect.
    """
    task = asyncio.ensure_future(handler)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        logger.info("client disconnected from %s before the response was ready", request.url.path)
        return Response(status_code=499)
    return task.result()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, error: InvalidRequest) -> JSONResponse:
        logger.warning("rejected %s with %d: %s", request.url.path, error.status_code, error.message)
        return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI returns 422 for an invalid body, but OpenAI returns 400
        errors = error.errors()
        if errors and errors[0].get("type") == "json_invalid":
            detail = (errors[0].get("ctx") or {}).get("error", "")
            message = f"the request body is not valid JSON: {detail}".rstrip(": ")
            logger.warning("rejected %s with 400: %s", request.url.path, message)
            return JSONResponse(error_body(message), status_code=400)
        messages = []
        for item in errors[:3]:
            location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            messages.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
        if len(errors) > 3:
            messages.append(f"and {len(errors) - 3} more")
        message = "invalid request: " + "; ".join(messages)
        first = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(part) for part in first if part != "body") or None
        logger.warning("rejected %s with 400: %s", request.url.path, message)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        logger.warning("%s %s returned %d: %s", request.method, request.url.path, error.status_code, error.detail)
        return JSONResponse(error_body(str(error.detail)), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request: Request, error: EngineUnavailable) -> JSONResponse:
        logger.error("%s returned 503: %s", request.url.path, error)
        return JSONResponse(error_body(str(error), type="server_error"), status_code=503)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s failed", request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(error).__name__}: {error}", type="server_error"),
                            status_code=500)
