"""Attention over the paged KV cache for a mixed batch of prefill chunks and single-token decodes.

The batch is laid out prefills first, then decodes. New K/V are written into the cache by slot
(block * block_size + offset); each query then attends to its sequence's cached keys. Grouped-query
attention is handled by folding the query heads that share a KV head into the query-length axis,
so K/V are never repeated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's chunk of new tokens: queries [start, start+num_queries) see context_len keys."""

    start: int
    num_queries: int
    context_len: int  # keys visible to the last query: cached tokens + this chunk
    context_slots: torch.Tensor | None  # (context_len,) cache slots, None when the chunk is the whole context
    mask: torch.Tensor | None = None  # (1, 1, group * num_queries, context_len) bool, built once per step


@dataclass(slots=True)
class DecodeGroup:
    """Decodes whose block tables have the same length, rows [start, start+count) of the decode rows.

    Grouping by length keeps each sequence's keys padded exactly as when it decodes alone: SDPA rounds
    differently for different padded lengths, which would make a request's output depend on its batch.
    """

    start: int
    count: int
    block_ids: torch.Tensor  # (count * num_blocks,) the group's block tables, flat
    mask: torch.Tensor  # (count, 1, group, num_blocks * block_size) bool: key is valid


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0  # decodes occupy [num_prefill_tokens, T)
    decode_groups: list[DecodeGroup] = field(default_factory=list)


def grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Q, K) mask -> (B, 1, group * Q, K), matching queries folded by `_grouped_sdpa`.

    Built once per step by the runner, since every layer uses the same mask.
    """
    return mask.unsqueeze(1).repeat(1, 1, group, 1)


def build_prefill_mask(num_queries: int, context_len: int, device: torch.device) -> torch.Tensor:
    """(1, Q, K) causal mask for a chunk whose first query sits at position context_len - num_queries."""
    offset = context_len - num_queries
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)
    return (k_pos <= q_pos).unsqueeze(0)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values (T, kv_heads, head_dim) at their slots in (num_blocks, block_size, kv_heads, head_dim)."""
    kv_heads, head_dim = k.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool, scale: float) -> torch.Tensor:
    """q (B, H, Q, D), k/v (B, KVH, K, D), mask (B, 1, group * Q, K) from grouped_mask -> (B, H, Q, D)."""
    batch, heads, num_q, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    # Fold the `group` query heads sharing one KV head into the query axis: (B, KVH, group * Q, D).
    q = q.reshape(batch, kv_heads, group * num_q, head_dim)
    if is_causal:
        mask = grouped_mask(torch.ones(1, num_q, k.shape[2], dtype=torch.bool, device=q.device).tril(), group)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, num_q, head_dim)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q (T, H, D), k/v (T, KVH, D) for the new tokens -> attention output (T, H, D)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    kv_heads, head_dim = k.shape[-2:]
    if not meta.prefills:  # decode-only step (the common case while serving): no output assembly
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_queries)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
        if span.context_slots is None:  # the chunk is the whole context: plain causal attention
            ks, vs = k[rows], v[rows]
            mask, causal = None, True
        else:
            ks, vs = flat_k.index_select(0, span.context_slots), flat_v.index_select(0, span.context_slots)
            mask, causal = span.mask, False
        ks = ks.transpose(0, 1).unsqueeze(0)  # (1, KVH, K, D)
        vs = vs.transpose(0, 1).unsqueeze(0)
        out[rows] = _grouped_sdpa(qs, ks, vs, mask, causal, scale)[0].transpose(0, 1)
    if meta.decode_groups:
        out[meta.num_prefill_tokens:] = _decode_attention(q[meta.num_prefill_tokens:], k_cache, v_cache, meta, scale)
    return out


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """One query per sequence, batched per DecodeGroup: q (B, H, D) -> (B, H, D)."""
    if len(meta.decode_groups) == 1:
        return _decode_group(q, k_cache, v_cache, meta.decode_groups[0], scale)
    out = torch.empty_like(q)
    for group in meta.decode_groups:
        rows = slice(group.start, group.start + group.count)
        out[rows] = _decode_group(q[rows], k_cache, v_cache, group, scale)
    return out


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
                  scale: float) -> torch.Tensor:
    batch, _, head_dim = q.shape
    kv_heads = k_cache.shape[-2]
    # index_select on whole blocks is a few memcpys; (B, num_blocks * block_size, KVH, D) -> (B, KVH, L, D)
    ks = k_cache.index_select(0, group.block_ids).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    vs = v_cache.index_select(0, group.block_ids).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    return _grouped_sdpa(q.unsqueeze(2), ks, vs, group.mask, False, scale).view(batch, -1, head_dim)
