"""Request state shared by the scheduler, the engine and the simulator."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class StopCriteria:
    """Token-level stop rules; stop strings are applied by the engine's detokenizer."""

    max_tokens: int  # maximum number of output tokens
    min_tokens: int = 0  # output tokens that must exist before EOS or a stop token id may be produced
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class Request:
    """One request's tokens, KV progress and timing.

    `num_computed_tokens` counts the tokens whose K/V are in the cache. After a preemption by
    recompute it drops to 0 and the prompt plus every output token so far is prefilled again.
    """

    request_id: str
    prompt_token_ids: list[int]
    stop: StopCriteria
    arrival_time: float  # seconds, in the caller's clock
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    block_ids: list[int] = field(default_factory=list)
    num_reserved_tokens: int = 0  # token slots reserved at admission (contiguous allocation only)

    # timing, in the caller's clock
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: the length the cache must hold to produce the next token."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the maximum output: the most KV slots this request can ever need."""
        return len(self.prompt_token_ids) + self.stop.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, index: int) -> int:
        num_prompt = len(self.prompt_token_ids)
        if index < num_prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - num_prompt]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids in positions [start, end) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    def check_stop(self, token_id: int) -> str | None:
        """Return the finish reason that `token_id`, just appended, causes, or None."""
        num_output = len(self.output_token_ids)
        if num_output > self.stop.min_tokens:
            if not self.stop.ignore_eos and token_id == self.stop.eos_token_id:
                return "stop"
            if token_id in self.stop.stop_token_ids:
                return "stop"
        if num_output >= self.stop.max_tokens:
            return "length"
        return None
