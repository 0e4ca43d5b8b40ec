"""OpenAI completions and chat completions on top of the async engine: request checks,
prompt rendering, and the JSON or server-sent-event (SSE) responses."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from flashserve.outputs import RequestOutput
from flashserve.sampling_params import MAX_SEED, SamplingParams
from flashserve.server.async_engine import AsyncEngine, EngineUnavailable, GenerationStream, SubmitItem
from flashserve.server.protocol import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    InvalidRequest,
    SamplingFields,
    error_body,
    usage_dict,
)

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
REPLACEMENT_CHAR = "\ufffd"


def render_plain_chat(messages: list[dict[str, str]]) -> str:
    """Render messages with the plain chat template, used where the tokenizer has none: a
    "role: content" line per message, then "assistant:" for the model to continue."""
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    return "".join(lines) + "assistant:"


def render_chat(tokenizer, messages: list[ChatMessage]) -> tuple[str, bool]:
    """Render the messages to prompt text; also return whether the tokenizer should add BOS.

    A tokenizer's own chat template writes its special tokens into the text, so they are not
    added again. The plain template lets the tokenizer add them, as for a completion prompt.
    """
    conversation = []
    for index, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{index}].role must be one of {list(CHAT_ROLES)}, got {message.role!r}",
                param=f"messages.[{index}].role",
            )
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"messages[{index}].content: only text parts are supported, got a part of type {part.type!r}",
                        param=f"messages.[{index}].content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        conversation.append({"role": message.role, "content": content or ""})

    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja2 raises TemplateError subclasses for messages a template rejects
            raise InvalidRequest(f"the model's chat template rejected the messages: {error}", param="messages") from None
        return text, False
    return render_plain_chat(conversation), True


class TokenText:
    """Text of single tokens for logprobs, cached per token id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, as_token_id: bool = False) -> str:
        if as_token_id:
            return f"token_id:{token_id}"
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if REPLACEMENT_CHAR in text:
                # a byte that is only part of a UTF-8 character: show the vocabulary entry instead
                text = self.tokenizer.convert_ids_to_tokens(token_id)
            self._cache[token_id] = text
        return text


@dataclass
class ChoiceDelta:
    """Text, token ids and logprobs that one engine request added in a batch of outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    output: RequestOutput | None = None  # the newest output

    @property
    def finish_reason(self) -> str | None:
        return self.output.outputs[0].finish_reason if self.output.finished else None

    @property
    def stop_reason(self) -> str | int | None:
        return self.output.outputs[0].stop_reason if self.output.finished else None


def merge_batch(batch: list[RequestOutput]) -> dict[str, ChoiceDelta]:
    """Combine consecutive outputs of each request into one delta, keeping first-seen order."""
    deltas: dict[str, ChoiceDelta] = {}
    for output in batch:
        delta = deltas.setdefault(output.request_id, ChoiceDelta())
        delta.text += output.new_text
        delta.token_ids.extend(output.new_token_ids)
        logprobs = output.outputs[0].logprobs
        if logprobs is not None and output.new_token_ids:
            delta.logprobs.extend(logprobs[len(logprobs) - len(output.new_token_ids):])
        delta.output = output
    return deltas


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class OpenAIServing:
    """Handlers of /v1/completions and /v1/chat/completions."""

    def __init__(self, async_engine: AsyncEngine, served_model_names: list[str]):
        self.async_engine = async_engine
        self.engine = async_engine.engine
        self.served_model_names = served_model_names
        self.tokenizer = self.engine.tokenizer
        self.token_text = TokenText(self.tokenizer)

    def check_model(self, model: str) -> None:
        if model not in self.served_model_names:
            raise InvalidRequest(
                f"The model `{model}` does not exist; this server serves {self.served_model_names}",
                param="model", status_code=404, code="model_not_found",
            )

    # request checks

    def sampling_params(self, body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """SamplingParams of one choice; InvalidRequest for a value the engine does not accept."""
        if not 1 <= body.n <= MAX_N:
            raise InvalidRequest(f"n must be between 1 and {MAX_N}, got {body.n}", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(body, name)
            if value not in (None, 0, 0.0):
                raise InvalidRequest(f"{name} is not supported by this server; send 0 or leave it out, got {value}",
                                     param=name)
        if body.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server; leave it out", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")

        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                seed=body.seed,
                max_tokens=max_tokens,
                min_tokens=body.min_tokens,
                stop=stop,
                stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
            )
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    def make_items(self, request_id: str, prompts: list[str | list[int]], params: SamplingParams, n: int,
                   stream: bool, add_special_tokens: bool = True, fill_max_tokens: bool = False) -> list[SubmitItem]:
        """Build one engine request per (prompt, choice), in choice-index order: prompt i, choice j is i * n + j."""
        items = []
        for prompt_index, prompt in enumerate(prompts):
            for choice in range(n):
                choice_params = params
                if params.seed is not None and choice > 0:
                    choice_params = replace(params, seed=(params.seed + choice) % (MAX_SEED + 1))
                items.append(SubmitItem(
                    request_id=f"{request_id}-{prompt_index}-{choice}",
                    prompt=prompt,
                    params=choice_params,
                    stream=stream,
                    add_special_tokens=add_special_tokens,
                    fill_max_tokens=fill_max_tokens,
                ))
        return items

    def log_unknown_fields(self, body) -> None:
        unknown = body.unknown_fields()
        if unknown:
            logger.warning("ignoring unsupported request fields %s", unknown)

    # completions

    async def create_completion(self, body: CompletionRequest):
        self.check_model(body.model)
        self.log_unknown_fields(body)
        if body.suffix is not None:
            raise InvalidRequest("suffix is not supported by this server; leave it out", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequest(f"best_of must equal n ({body.n}) on this server, got {body.best_of}", param="best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidRequest(f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {body.logprobs}",
                                 param="logprobs")
        if body.echo and body.logprobs is not None:
            # NOTE: the engine computes log-probabilities of output tokens only, not of the prompt.
            raise InvalidRequest("echo together with logprobs is not supported: prompt logprobs are not computed",
                                 param="echo")

        prompts = self._completion_prompts(body.prompt)
        # None: the engine loop fills in the context left after the prompt
        max_tokens = max(1, body.min_tokens) if body.max_tokens is None else body.max_tokens
        params = self.sampling_params(body, max_tokens, body.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        items = self.make_items(request_id, prompts, params, body.n, body.stream,
                                fill_max_tokens=body.max_tokens is None)
        stream, prompt_token_ids = await self.async_engine.submit(items)

        echo_texts = None
        if body.echo:
            echo_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        response = _CompletionResponse(self, body, request_id, items, prompt_token_ids, echo_texts)
        if body.stream:
            return self._streaming_response(stream, response.stream(stream))
        return await self._collect(stream, items, response.final)

    @staticmethod
    def _completion_prompts(prompt) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]
        for index, item in enumerate(prompt):
            if isinstance(item, list) and not item:
                raise InvalidRequest(f"prompt {index} has no token ids", param="prompt")
        return list(prompt)

    # chat completions

    async def create_chat_completion(self, body: ChatCompletionRequest):
        self.check_model(body.model)
        self.log_unknown_fields(body)
        top_logprobs = None
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_CHAT_TOP_LOGPROBS:
                raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS}, got "
                                     f"{body.top_logprobs}", param="top_logprobs")
            top_logprobs = body.top_logprobs
        engine_logprobs = (top_logprobs or 0) if body.logprobs else None

        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prompt, add_special_tokens = render_chat(self.tokenizer, body.messages)
        # None: the engine loop fills in the context left after the prompt
        placeholder = max(1, body.min_tokens) if max_tokens is None else max_tokens
        params = self.sampling_params(body, placeholder, engine_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        items = self.make_items(request_id, [prompt], params, body.n, body.stream,
                                add_special_tokens=add_special_tokens, fill_max_tokens=max_tokens is None)
        stream, prompt_token_ids = await self.async_engine.submit(items)

        response = _ChatResponse(self, body, request_id, items, prompt_token_ids, top_logprobs or 0)
        if body.stream:
            return self._streaming_response(stream, response.stream(stream))
        return await self._collect(stream, items, response.final)

    # shared response plumbing

    def _streaming_response(self, stream: GenerationStream, chunks: AsyncIterator[str]) -> StreamingResponse:
        # NOTE: each chunk passes through Starlette's middleware and uvicorn's pure-Python h11
        # protocol. This fixed CPU cost per streamed step matters most for small models with short
        # requests, and benchmarks/http_vs_offline.py measures it against the offline engine.
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            except EngineUnavailable as error:
                logger.error("stream ended by the engine: %s", error)
                yield sse(error_body(str(error), type="server_error"))
                yield sse("[DONE]")
            finally:
                # runs on normal end, on engine errors and when the client disconnects (cancellation)
                self.async_engine.abort(sorted(stream.unfinished))

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _collect(self, stream: GenerationStream, items: list[SubmitItem], build) -> JSONResponse:
        final: dict[str, RequestOutput] = {}
        try:
            async for batch in stream.batches():
                for output in batch:
                    final[output.request_id] = output
        finally:
            self.async_engine.abort(sorted(stream.unfinished))
        return JSONResponse(build([final[item.request_id] for item in items]))


class _ResponseBase:
    """State shared by the chunks of one streamed or collected response."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, serving: OpenAIServing, body: SamplingFields, request_id: str, items: list[SubmitItem],
                 prompt_token_ids: list[list[int]]):
        self.serving = serving
        self.body = body
        self.request_id = request_id
        self.created = int(time.time())
        self.model = body.model
        self.choice_index = {item.request_id: index for index, item in enumerate(items)}
        self.n = body.n
        # usage counts each prompt once, however many choices it has
        self.num_prompt_tokens = sum(len(ids) for ids in prompt_token_ids[::body.n])
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(self, choices: list[dict]) -> dict[str, Any]:
        chunk = {"id": self.request_id, "object": self.chunk_object_name, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        chunk = self.chunk([])
        chunk["usage"] = usage_dict(self.num_prompt_tokens, completion_tokens)
        return chunk

    def envelope(self, choices: list[dict], outputs: list[RequestOutput]) -> dict[str, Any]:
        completion_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"id": self.request_id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage_dict(self.num_prompt_tokens, completion_tokens)}


class _CompletionResponse(_ResponseBase):
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, serving, body: CompletionRequest, request_id, items, prompt_token_ids, echo_texts):
        super().__init__(serving, body, request_id, items, prompt_token_ids)
        self.echo_texts = echo_texts
        self.as_token_ids = body.return_tokens_as_token_ids

    def _echo(self, choice: int) -> str:
        return self.echo_texts[choice // self.n] if self.echo_texts is not None else ""

    def logprobs(self, token_ids: list[int], entries: list[dict[int, float]], offset: int) -> dict[str, Any]:
        """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs and text_offset.

        NOTE: text_offset adds up the lengths of single-token texts, so it can drift from the
        response text where several tokens form one character.
        """
        token_text = self.serving.token_text
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = token_text(token_id, self.as_token_ids)
            tokens.append(text)
            token_logprobs.append(entry.get(token_id))
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)
            top_logprobs.append({token_text(t, self.as_token_ids): lp for t, lp in ranked})
            text_offset.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    async def stream(self, stream: GenerationStream) -> AsyncIterator[str]:
        started: set[int] = set()
        offsets: dict[int, int] = {}
        completion_tokens = 0
        async for batch in stream.batches():
            choices = []
            for request_id, delta in merge_batch(batch).items():
                index = self.choice_index[request_id]
                text = delta.text
                if index not in started:
                    started.add(index)
                    text = self._echo(index) + text
                logprobs = None
                if self.body.logprobs is not None:
                    logprobs = self.logprobs(delta.token_ids, delta.logprobs, offsets.get(index, 0))
                    offsets[index] = (logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                                      if logprobs["tokens"] else offsets.get(index, 0))
                completion_tokens += len(delta.token_ids)
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason})
            yield sse(self.chunk(choices))
        if self.include_usage:
            yield sse(self.usage_chunk(completion_tokens))
        yield sse("[DONE]")

    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(outputs):
            completion = output.outputs[0]
            echo = self._echo(index)
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = self.logprobs(completion.token_ids, completion.logprobs or [], len(echo))
            choices.append({"index": index, "text": echo + completion.text, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason})
        return self.envelope(choices, outputs)


class _ChatResponse(_ResponseBase):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, serving, body: ChatCompletionRequest, request_id, items, prompt_token_ids, top_logprobs: int):
        super().__init__(serving, body, request_id, items, prompt_token_ids)
        self.top_logprobs = top_logprobs
        self.as_token_ids = body.return_tokens_as_token_ids

    def logprobs(self, token_ids: list[int], entries: list[dict[int, float]]) -> dict[str, Any]:
        """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        token_text = self.serving.token_text

        def entry_of(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_text(token_id, self.as_token_ids)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for token_id, entry in zip(token_ids, entries):
            ranked = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:self.top_logprobs]
            item = entry_of(token_id, entry.get(token_id))
            item["top_logprobs"] = [entry_of(t, lp) for t, lp in ranked]
            content.append(item)
        return {"content": content}

    async def stream(self, stream: GenerationStream) -> AsyncIterator[str]:
        # the role goes out first, in its own chunk per choice, as OpenAI sends it
        role_choices = [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for index in range(len(self.choice_index))]
        yield sse(self.chunk(role_choices))

        completion_tokens = 0
        async for batch in stream.batches():
            choices = []
            for request_id, delta in merge_batch(batch).items():
                logprobs = self.logprobs(delta.token_ids, delta.logprobs) if self.body.logprobs else None
                completion_tokens += len(delta.token_ids)
                choices.append({"index": self.choice_index[request_id], "delta": {"content": delta.text},
                                "logprobs": logprobs, "finish_reason": delta.finish_reason,
                                "stop_reason": delta.stop_reason})
            yield sse(self.chunk(choices))
        if self.include_usage:
            yield sse(self.usage_chunk(completion_tokens))
        yield sse("[DONE]")

    def final(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(outputs):
            completion = output.outputs[0]
            logprobs = self.logprobs(completion.token_ids, completion.logprobs or []) if self.body.logprobs else None
            choices.append({"index": index, "message": {"role": "assistant", "content": completion.text},
                            "logprobs": logprobs, "finish_reason": completion.finish_reason,
                            "stop_reason": completion.stop_reason})
        return self.envelope(choices, outputs)
