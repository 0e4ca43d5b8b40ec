"""Request bodies of the OpenAI-compatible API (pydantic), and OpenAI's error body.

Field names and defaults follow the OpenAI API; `top_k`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens` and `return_tokens_as_token_ids` are vLLM's extensions
with vLLM's names. Unknown fields are accepted and listed in a warning, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 128  # maximum choices (`n`) per prompt
MAX_COMPLETION_LOGPROBS = 5  # maximum `logprobs` of /v1/completions
MAX_CHAT_TOP_LOGPROBS = 20  # maximum `top_logprobs` of /v1/chat/completions


class InvalidRequest(ValueError):
    """A client mistake. The server returns HTTP 400 (or `status_code`) with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    include_usage: bool | None = False  # send one last chunk with `choices: []` and the usage


class SamplingFields(OpenAIRequest):
    """Sampling fields shared by completions and chat completions."""

    model: str
    n: int = 1  # choices per prompt
    temperature: float | None = None  # None means OpenAI's default, 1.0; 0 is greedy
    top_p: float | None = None  # None means 1.0
    stop: str | list[str] | None = None
    seed: int | None = None  # choice i of a seeded request samples with seed + i
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    # fields the engine does not implement: only their neutral values are accepted
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    # vLLM extensions
    top_k: int | None = None  # -1 or 0 keep all tokens
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:N" instead of text


class CompletionRequest(SamplingFields):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None  # top log-probabilities per token, 0 to 5
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # 0 to 20, needs logprobs=true


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
