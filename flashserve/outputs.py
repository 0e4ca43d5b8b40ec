"""Results of `LLM.generate()`, in vLLM's shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from flashserve.core.records import RequestRecord


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per output token: top token id -> log-prob

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestRecord | None = None  # the request's timing record
    new_token_ids: list[int] = field(default_factory=list)  # tokens added since the last output
    new_text: str = ""  # text added since the last output (streaming)
