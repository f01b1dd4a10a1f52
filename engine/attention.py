"""Attention over the paged KV cache for a mixed batch of prefill chunks and single-token decodes.

The batch is laid out prefills first, then decodes. New K/V are written into the cache by slot
(block * block_size + offset); each query then attends to its sequence's cached keys. Grouped-query
attention is handled by folding the query heads that share a KV head into the query-length axis,
so K/V are never repeated in memory.

Which attention a layer computes is its `AttentionSpec` (scale, sliding window, score soft-capping);
where it reads keys from is the backend passed to the model's forward: `AttentionMetadata` (this
module, the paged cache) or `EagerAttention` (engine/attention_eager.py, weights kept for inspection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from engine import paged_decode


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """One layer's attention as its architecture describes it."""

    layer: int  # index of the layer: the eager backend keys weights and K/V by it
    scale: float  # multiplies q.k (head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5)
    window: int | None = None  # sliding window: a query sees itself and the window - 1 keys before it
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's chunk of new tokens: queries [start, start+num_queries) see context_len keys."""

    start: int
    num_queries: int
    context_len: int  # keys visible to the last query: cached tokens + this chunk
    context_slots: torch.Tensor | None  # (context_len,) cache slots, None when the chunk is the whole context
    mask: torch.Tensor | None = None  # (1, 1, group * num_queries, context_len) bool, built once per step
    window_mask: torch.Tensor | None = None  # the same, limited to the model's sliding window (when it has one)


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
    window_mask: torch.Tensor | None = None  # the same, limited to the model's sliding window (when it has one)


@dataclass(slots=True)
class DecodeTables:
    """Every decode row's block table and length, for kvserve's paged kernel (engine/paged_decode.py)."""

    block_tables: torch.Tensor  # (rows, max_blocks) int32, padded with 0 (never read past a row's length)
    context_lens: torch.Tensor  # (rows,) int32: keys the row's query sees, itself included


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    prefills: list[PrefillSpan] = field(default_factory=list)
    num_prefill_tokens: int = 0  # decodes occupy [num_prefill_tokens, T)
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the gather + SDPA path's decodes
    decode_tables: DecodeTables | None = None  # the paged kernel's decodes (set instead of decode_groups)
    # Decode attention on one CPU thread (EngineConfig.batch_invariant): PyTorch's CPU flash attention
    # divides its work among threads by the size of the call, and for some head shapes (SmolLM2's 3 KV
    # heads of 64 at 2 threads) a row then rounds differently with the number of rows in the call; on one
    # thread every row is computed as alone (measured).
    single_thread_decode: bool = False


def grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Q, K) mask -> (B, 1, group * Q, K), matching queries folded by `_grouped_sdpa`.

    Built once per step by the runner, since every layer uses the same mask.
    """
    return mask.unsqueeze(1).repeat(1, 1, group, 1)


def build_prefill_mask(num_queries: int, context_len: int, device: torch.device,
                       window: int | None = None) -> torch.Tensor:
    """(1, Q, K) causal mask for a chunk whose first query sits at position context_len - num_queries.

    With a window, a query at position p sees keys p - window < k <= p (transformers' sliding window).
    """
    offset = context_len - num_queries
    q_pos = torch.arange(num_queries, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(context_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask.unsqueeze(0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              backend: AttentionMetadata | AttentionBackend, spec: AttentionSpec) -> torch.Tensor:
    """The attention a layer calls: q (T, H, D), k/v (T, KVH, D) -> (T, H, D) through the chosen backend.

    The paged cache serves; any other backend (the inspection path's EagerAttention) computes it its own way.
    """
    if isinstance(backend, AttentionMetadata):
        return paged_attention(q, k, v, k_cache, v_cache, backend, spec)
    return backend.attend(q, k, v, spec)


class AttentionBackend(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor: ...


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values (T, kv_heads, head_dim) at their slots in (num_blocks, block_size, kv_heads, head_dim)."""
    if paged_decode.write_kv(k_cache, v_cache, k, v, slot_mapping):
        return
    kv_heads, head_dim = k.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  is_causal: bool, spec: AttentionSpec) -> torch.Tensor:
    """q (B, H, Q, D), k/v (B, KVH, K, D), mask (B, 1, group * Q, K) from grouped_mask -> (B, H, Q, D)."""
    batch, heads, num_q, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if group == 1 and spec.softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=spec.scale)
    # Fold the `group` query heads sharing one KV head into the query axis: (B, KVH, group * Q, D).
    q = q.reshape(batch, kv_heads, group * num_q, head_dim)
    if is_causal:
        mask = grouped_mask(torch.ones(1, num_q, k.shape[2], dtype=torch.bool, device=q.device).tril(), group)
    if spec.softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale)
    elif batch == 1:
        out = _softcapped_attention(q, k, v, mask, spec)
    else:
        # One sequence at a time: a batched matmul over the gathered (strided) keys rounds a sequence's
        # scores differently from the same matmul on it alone (measured: 16-dim heads, 40 keys), which
        # would make its output depend on its batch. Views of one row compute exactly as alone.
        out = torch.cat([_softcapped_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1], spec)
                         for i in range(batch)])
    return out.reshape(batch, heads, num_q, head_dim)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          spec: AttentionSpec) -> torch.Tensor:
    """SDPA has no soft-capping: the scores written out, softmax in fp32 as transformers' eager Gemma 2."""
    scores = (q @ k.transpose(-1, -2)) * spec.scale
    scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, spec: AttentionSpec) -> torch.Tensor:
    """q (T, H, D), k/v (T, KVH, D) for the new tokens -> attention output (T, H, D)."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    kv_heads, head_dim = k.shape[-2:]
    if not meta.prefills:  # decode-only step (the common case while serving): no output assembly
        return _decode_attention(q, k_cache, v_cache, meta, spec)
    out = torch.empty_like(q)
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_queries)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
        windowed = spec.window is not None and span.window_mask is not None
        if span.context_slots is None:  # the chunk is the whole context: plain causal attention
            ks, vs = k[rows], v[rows]
            mask, causal = (span.window_mask, False) if windowed else (None, True)
        else:
            ks, vs = flat_k.index_select(0, span.context_slots), flat_v.index_select(0, span.context_slots)
            mask, causal = span.window_mask if windowed else span.mask, False
        ks = ks.transpose(0, 1).unsqueeze(0)  # (1, KVH, K, D)
        vs = vs.transpose(0, 1).unsqueeze(0)
        out[rows] = _grouped_sdpa(qs, ks, vs, mask, causal, spec)[0].transpose(0, 1)
    if meta.decode_groups or meta.decode_tables is not None:
        out[meta.num_prefill_tokens:] = _decode_attention(q[meta.num_prefill_tokens:], k_cache, v_cache, meta, spec)
    return out


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run the block on `count` torch threads (None: as set)."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      spec: AttentionSpec) -> torch.Tensor:
    """One query per sequence: q (B, H, D) -> (B, H, D), by the paged kernel or batched per DecodeGroup."""
    if meta.decode_tables is not None:
        tables = meta.decode_tables
        return paged_decode.decode_attention(q, k_cache, v_cache, tables.block_tables, tables.context_lens, spec)
    with _threads(1 if meta.single_thread_decode else None):
        if len(meta.decode_groups) == 1:
            return _decode_group(q, k_cache, v_cache, meta.decode_groups[0], spec)
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            rows = slice(group.start, group.start + group.count)
            out[rows] = _decode_group(q[rows], k_cache, v_cache, group, spec)
        return out


def _decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup,
                  spec: AttentionSpec) -> torch.Tensor:
    batch, _, head_dim = q.shape
    kv_heads = k_cache.shape[-2]
    # index_select on whole blocks is a few memcpys; (B, num_blocks * block_size, KVH, D) -> (B, KVH, L, D)
    ks = k_cache.index_select(0, group.block_ids).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    vs = v_cache.index_select(0, group.block_ids).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    mask = group.window_mask if spec.window is not None and group.window_mask is not None else group.mask
    return _grouped_sdpa(q.unsqueeze(2), ks, vs, mask, False, spec).view(batch, -1, head_dim)
