"""Per-request sampling and stopping options, named as in vLLM."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request.

    temperature: 0 means greedy decoding; higher values flatten the distribution. Default 1.0.
    top_p: keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1].
    top_k: keep the k most likely tokens; 0 or -1 keeps all.
    seed: per-request random seed, so a request samples the same tokens in any batch.
    max_tokens: maximum output tokens (default 16, as in vLLM).
    min_tokens: output tokens before EOS or a stop token id may end the request.
    stop: strings that end the output; the stop string and what follows are not returned.
    stop_token_ids: token ids that end the output (the id is kept in `token_ids`).
    ignore_eos: keep generating after EOS until max_tokens.
    logprobs: number of most likely tokens whose log-probabilities are returned per output
        token (0 to 20), or None for none.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field, its value and the allowed range."""
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k < 0 and self.top_k != -1):
            raise ValueError(f"top_k must be -1, 0 (both keep all tokens) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be None or an integer in [0, 2**63 - 1], got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be an integer in [0, 20] or None, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
