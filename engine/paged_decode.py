"""kvserve's CPU decode-attention kernel (csrc/paged_decode.cpp, built and loaded by engine/native.py).

Decode attention reads each sequence's keys where they lie in the paged cache; the default path before it
(engine/attention.py: gather the blocks, then PyTorch's SDPA) copied the whole context once per layer and
step and, for some head shapes, rounded a row by its batch. Here every row is computed alone and in a
fixed order, so a request's output never depends on its batch, on any thread count.

Where the kernels cannot be built (no compiler), `native.unavailable_reason()` says why and the engine keeps
the gather + SDPA path (`attention_backend="native"` makes that an error instead). It reads fp32 caches (CPU
fp32 models, the default) and bf16 ones (--dtype bfloat16), computing in fp32 either way.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import torch

from engine.native import KernelUnavailable, function, unavailable_reason

if TYPE_CHECKING:
    from engine.attention import AttentionSpec

_SYMBOLS = {torch.float32: "kvserve_paged_decode_f32", torch.bfloat16: "kvserve_paged_decode_bf16"}  # by cache dtype
_ARGTYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 4, *[ctypes.c_int64] * 6,
             ctypes.c_float, ctypes.c_int64, ctypes.c_float)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a KV cache of this device and dtype is one the kernel reads: CPU, fp32 or bf16."""
    return device.type == "cpu" and dtype in _SYMBOLS


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """q (rows, heads, D) -> (rows, heads, D): each row attends to keys 0..context_lens[row]-1 of its table.

    q's rows may lie apart (a view), each row's heads together; k_cache/v_cache (blocks, block_size, kv_heads, D)
    fp32 or bf16, block_tables (rows, max_blocks) int32 (negative: a block given back, skipped), context_lens
    (rows,) int32; all contiguous CPU tensors. The math is fp32 whatever the cache holds; the result comes back
    in q's dtype.
    """
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    # Rows may lie apart (q beside k in the rotary's output), each row's heads together.
    heads_together = q.stride(2) == 1 and q.stride(1) == head_dim
    q32 = q if q.dtype == torch.float32 and heads_together else q.float().contiguous()
    out = torch.empty(q32.shape)
    _kernel(k_cache.dtype)(
        out.data_ptr(), q32.data_ptr(), q32.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), rows, heads, kv_heads, head_dim, block_size, block_tables.shape[1],
        spec.scale, spec.window or 0, spec.softcap or 0.0)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


@functools.cache
def _kernel(cache_dtype: torch.dtype):
    return function(_SYMBOLS[cache_dtype], *_ARGTYPES)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> bool:
    """Copy the new tokens' k and v (T, kv_heads, D) to their slots of a CPU cache (blocks, block_size,
    kv_heads, D), by csrc/paged_decode.cpp; False (nothing written) where it does not take these tensors."""
    writer = _kv_writer()
    if (writer is None or not k_cache.is_cpu or not k.is_cpu or k.dtype != k_cache.dtype or v.dtype != k_cache.dtype
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or slot_mapping.dtype != torch.long or not slot_mapping.is_contiguous()
            or not _rows_contiguous(k) or not _rows_contiguous(v)):
        return False
    element = k.element_size()
    writer(k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0) * element,
           v.stride(0) * element, slot_mapping.data_ptr(), k.shape[0], k.shape[1] * k.shape[2] * element)
    return True


def _rows_contiguous(x: torch.Tensor) -> bool:
    """Whether each token's (kv_heads, D) values lie together, as a slot of the cache holds them."""
    return x.stride(2) == 1 and x.stride(1) == x.shape[2]


@functools.cache
def _kv_writer():
    try:
        return function("kvserve_write_kv", *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int64, ctypes.c_int64)
    except KernelUnavailable:  # PyTorch's index_copy_ then (use_native below says why, where it matters)
        return None


BACKENDS = ("auto", "native", "sdpa")


def use_native(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether decode attention runs on the kernel, and why not where `auto` falls back to gather + SDPA.

    'sdpa' never uses it, 'native' must (ValueError where it cannot), 'auto' uses it wherever it can.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "sdpa":
        return False, None
    reason = None if supports(device, dtype) else f"it reads fp32 and bf16 KV caches on CPU, not {dtype} on {device.type}"
    reason = reason or unavailable_reason()
    if reason and backend == "native":
        raise ValueError(f"attention_backend=native: {reason}")
    return reason is None, reason
