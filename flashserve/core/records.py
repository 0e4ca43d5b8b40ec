"""Per-request and per-step records: the one schema every system (engine, simulator, HF
baseline, HTTP client) emits, so metrics are computed once from the same tables."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    """Timing and token counts of one request. Times are seconds in the run's clock."""

    request_id: str
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_preemptions: int
    finish_reason: str | None  # "stop", "length", "abort", or "error" for a failed HTTP request
    token_times: list[float] = field(default_factory=list)  # time each output token was produced
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepRecord:
    """One engine iteration: what was scheduled and the KV cache state it left.

    KV figures are counted after the step's tokens are written: `kv_tokens_used` tokens are
    stored in `kv_blocks_used` blocks (`kv_slots_allocated` slots). `kv_slots_reserved` are the
    allocated slots in blocks that hold no token yet (contiguous reservation ahead of need).
    """

    step: int
    start_time: float
    duration: float
    num_prefill_tokens: int  # tokens of prompts (or recomputed context) processed this step
    num_decode_seqs: int  # sequences that processed exactly their one newest token
    num_prefill_seqs: int
    num_context_tokens: int  # sum over scheduled sequences of the tokens each attends to
    sum_sq_prefill_tokens: int  # sum of squared prefill chunk lengths (attention cost term)
    num_sampled: int  # sequences that produced a token this step
    num_running: int
    num_waiting: int
    num_preempted: int  # requests preempted while scheduling this step
    kv_blocks_used: int
    kv_blocks_total: int
    kv_tokens_used: int
    kv_slots_allocated: int
    kv_slots_reserved: int

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_seqs

    def to_dict(self) -> dict:
        return asdict(self)
