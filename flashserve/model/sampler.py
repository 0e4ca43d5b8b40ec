"""Next-token sampling: greedy, temperature, top-k, top-p, with per-request generators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.sampling_params import SamplingParams


@dataclass
class SampledToken:
    token_id: int
    logprobs: dict[int, float] | None = None  # top-n ids and the sampled id -> log-probability


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    suppressed: list[list[int]] | None = None,
) -> list[SampledToken]:
    """Sample one token per row of `logits` [N, vocab] under that row's SamplingParams.

    `suppressed[i]` lists token ids that row i may not produce: EOS and stop token ids while
    fewer than min_tokens tokens exist. Log-probabilities are reported from the raw logits.
    """
    raw_logits = logits.float()
    logits = raw_logits
    if suppressed and any(suppressed):
        logits = raw_logits.clone()
        for row, ids in enumerate(suppressed):
            if ids:
                logits[row, ids] = float("-inf")
    token_ids = logits.argmax(dim=-1)

    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if random_rows:
        rows = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [params[i] for i in random_rows])
        for j, i in enumerate(random_rows):
            choice = torch.multinomial(probs[j], 1, generator=generators[i])
            token_ids[i] = choice[0]

    token_list = token_ids.tolist()
    results = [SampledToken(token_id) for token_id in token_list]
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if logprob_rows:
        logprobs = torch.log_softmax(raw_logits[logprob_rows], dim=-1)
        for j, i in enumerate(logprob_rows):
            entry = {}
            n = params[i].logprobs
            if n:
                values, ids = logprobs[j].topk(n)
                entry = dict(zip(ids.tolist(), values.tolist()))
            entry[token_list[i]] = logprobs[j, token_list[i]].item()
            results[i].logprobs = entry
    return results


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    logits = logits / temperatures.unsqueeze(1)

    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
        sorted_logits = logits.sort(dim=-1, descending=True).values
        thresholds = sorted_logits.gather(1, (ks - 1).unsqueeze(1))
        logits = logits.masked_fill(logits < thresholds, float("-inf"))

    top_ps = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
    if (top_ps < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_ps.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))

    return logits.softmax(dim=-1)
