"""Paged attention through transformers' attention-function registry.

The model runs one forward pass over all scheduled tokens of a step, packed into a batch of
one: `input_ids` has shape [1, T]. transformers computes Q, K, V and RoPE as usual and then
calls the registered function below for each layer. It writes the step's K/V into the paged
cache through the slot mapping and reads each sequence's whole context back through its block
table, then runs PyTorch SDPA with a mask that is causal within the context.

Sequences are grouped so that padding stays small: single-token decodes in one SDPA call,
prefill chunks (several query tokens) in another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

# NOTE: the name must not contain "flash": transformers treats any such name as a FlashAttention kernel.
ATTN_IMPLEMENTATION = "paged_sdpa"


@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call, padded to `max_query_len` queries and `max_context_len` keys."""

    token_index: torch.Tensor  # [N] positions of the group's tokens in the packed step
    pad_index: torch.Tensor | None  # [N] positions in the padded [B * max_query_len] layout; None if no padding
    kv_slots: torch.Tensor  # [B, max_context_len] cache slot of each context position (0 where padded)
    mask: torch.Tensor | None  # [B, 1, max_query_len, max_context_len] True where a query may attend
    num_seqs: int
    max_query_len: int


@dataclass
class PagedAttentionMetadata:
    """Everything the attention function needs for one step, built once and shared by all layers."""

    slot_mapping: torch.Tensor  # [T] cache slot that each scheduled token's K/V is written to
    groups: list[AttentionGroup]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V), each [num_slots, kv_heads, head_dim]


def build_group(
    token_offsets: list[int],
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    """Metadata of one group. Sequence b has query tokens at packed offsets
    [token_offsets[b], + query_lens[b]) for positions [starts[b], starts[b] + query_lens[b])."""
    num_seqs = len(starts)
    max_query_len = max(query_lens)
    context_lens = [start + n for start, n in zip(starts, query_lens)]
    max_context_len = max(context_lens)

    token_index = torch.cat([torch.arange(o, o + n) for o, n in zip(token_offsets, query_lens)])

    # slot of every context position through the block table
    max_blocks = -(-max_context_len // block_size)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
    for b, blocks in enumerate(block_tables):
        used = blocks[:max_blocks]
        table[b, :len(used)] = torch.tensor(used, dtype=torch.long)
    positions = torch.arange(max_context_len)
    kv_slots = table[:, positions // block_size] * block_size + positions % block_size
    context = torch.tensor(context_lens).unsqueeze(1)
    kv_slots = torch.where(positions.unsqueeze(0) < context, kv_slots, torch.zeros_like(kv_slots))

    if max_query_len == 1:
        pad_index = None
        # a decode query is at the last context position, so it attends to every valid key
        mask = (positions.unsqueeze(0) < context).view(num_seqs, 1, 1, max_context_len)
    else:
        pad_index = torch.cat([torch.arange(b * max_query_len, b * max_query_len + n) for b, n in enumerate(query_lens)])
        query_pos = torch.tensor(starts).unsqueeze(1) + torch.arange(max_query_len).unsqueeze(0)  # [B, Q]
        mask = positions.view(1, 1, -1) <= query_pos.unsqueeze(-1)  # causal within the context
        # NOTE: padded query rows get key 0 so that SDPA never gets a fully masked row (NaN); their
        # outputs are dropped.
        is_pad = torch.arange(max_query_len).unsqueeze(0) >= torch.tensor(query_lens).unsqueeze(1)
        mask = mask | (is_pad.unsqueeze(-1) & (positions.view(1, 1, -1) == 0))
        mask = mask.unsqueeze(1)

    return AttentionGroup(
        token_index=token_index.to(device),
        pad_index=None if pad_index is None else pad_index.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask.to(device),
        num_seqs=num_seqs,
        max_query_len=max_query_len,
    )


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged_metadata: PagedAttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer over the paged cache. Shapes: query [1, H, T, D], key/value [1, KV, T, D]."""
    if paged_metadata is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs paged_metadata; "
            "run the model through flashserve's ModelRunner"
        )
    meta = paged_metadata
    key_cache, value_cache = meta.kv_caches[module.layer_idx]

    q = query[0].transpose(0, 1)  # [T, H, D]
    key_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(key_cache.dtype))
    value_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(value_cache.dtype))

    num_heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for group in meta.groups:
        batch, max_query_len = group.num_seqs, group.max_query_len
        group_q = q.index_select(0, group.token_index)
        if group.pad_index is None:
            padded_q = group_q.view(batch, 1, num_heads, head_dim)
        else:
            padded_q = q.new_zeros(batch * max_query_len, num_heads, head_dim)
            padded_q[group.pad_index] = group_q
            padded_q = padded_q.view(batch, max_query_len, num_heads, head_dim)

        k = key_cache[group.kv_slots]  # [B, L, KV, D]
        v = value_cache[group.kv_slots]
        attn = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=group.mask, scale=scaling, enable_gqa=True,
        )
        attn = attn.transpose(1, 2).reshape(batch * max_query_len, num_heads, head_dim)
        out[group.token_index] = attn if group.pad_index is None else attn[group.pad_index]

    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """The paged attention function builds its own masks from the metadata."""
    return None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
