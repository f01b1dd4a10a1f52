"""4-bit weights: groups of 32 with a scale and an offset (GGUF Q4_1's layout), and the kernel that multiplies them.

Batch-1 decode on a CPU reads every weight once per token, so its speed is the bytes read: 4.5 bits a
weight instead of fp16's 16. SmolLM2's GGUF stores its layers in Q4_1 (value = d * q + m, q in 0..15,
per group of 32), and a GGUF loaded here is dequantized to fp32; `four_bit_groups` finds that grid again
in the fp32 values, so `auto` keeps those weights 4-bit without rounding them a second time. A weight
that is not on such a grid (an fp16/bf16 checkpoint, Q8_0 or Q6_K tensors) stays in the float format,
unless `--quantization int4` asks for it: then it is rounded to the nearest grid as llama.cpp's Q4_1
quantizer does (lossy).

Where the CPU has AVX-512 VNNI or AVX2, kvserve's integer kernel multiplies them (w4a16_matmul.py: rows
quantized to 16 bits, exact int32 sums, closer to fp32 than what follows). Elsewhere, or with
`KVSERVE_INT4_KERNEL=bf16`, PyTorch's arithmetic: its kernel, `_weight_int4pack_mm_for_cpu`, computes with
bf16 activations (it is fast only in bf16; fp16 and fp32 inputs run a scalar path ~50x slower): each row
rounded to bf16 on the way in, its sums in fp32, the result rounded to bf16. Scales and offsets are bf16
too. It computes w = (q - 8) * scale + zero.

Where PyTorch packs the weights in its AVX-512 layout, kvserve's own kernel (csrc/int4_gemv.cpp) runs the
calls instead, on the same packed weights: it computes every output bitwise as PyTorch's kernel does, but
keeps more FMA chains in flight for 1-4 rows (~1.4x PyTorch's speed, most of a batch-1 step), dequantizes
each weight once for 8 rows rather than 4 from 5 rows up (~1.5x), and spares the casts around the call.
That it gives PyTorch's bits is checked once per process on random weights; any difference (another
PyTorch, another layout) keeps PyTorch's kernel for every call, as `KVSERVE_INT4_KERNEL=pytorch` does.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import NamedTuple

import torch

log = logging.getLogger("kvserve.engine")

GROUP = 32  # weights per scale/offset, as in Q4_0/Q4_1 and Q4_K's sub-blocks
_LEVELS = 15  # q in 0..15
_SAMPLE_ROWS = 16
_ON_GRID = 1e-3  # a weight is on its group's grid when within this fraction of a step of a level


class FourBitGroups(NamedTuple):
    q: torch.Tensor  # (out, in) int32 in 0..15 (uint8 as stored in a converted copy)
    step: torch.Tensor  # (out, in // GROUP) fp32: weight = low + q * step
    low: torch.Tensor  # (out, in // GROUP) fp32


def packable(weight: torch.Tensor) -> bool:
    """The kernel's shape limits: groups of 32 along the input, output rows in multiples of 16."""
    return weight.dim() == 2 and weight.shape[1] % GROUP == 0 and weight.shape[0] % 16 == 0


def four_bit_groups(weight: torch.Tensor) -> FourBitGroups | None:
    """The 4-bit grid the weight already lies on (every group of 32 is low + q * step, q in 0..15), or None.

    A group's lowest weight is level 0. Its highest is level 15 when the quantizer put it there (Q4_1
    does), but not always (Q4_0's symmetric levels, Q4_K's fitted ones): so each group tries the
    spans 15, 14, ... 1 between its extremes and keeps the first whose levels hold all of its weights.
    The first 16 rows are tried alone first, so a weight that is not 4-bit (an 8-bit LM head) is
    turned down without trying every span on all of it.
    """
    out_features, in_features = weight.shape
    if out_features > _SAMPLE_ROWS and four_bit_groups(weight[:_SAMPLE_ROWS]) is None:
        return None
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.aminmax(dim=-1, keepdim=True)
    span = high - low
    offsets = groups - low
    # Span 15 first, on every group at once (no rows picked out: a Q4_1 tensor is done in this one pass,
    # which keeps load time down). Constant groups come out as level 0 with step 0.
    step = span / _LEVELS
    q = torch.round(offsets / step.clamp_min(torch.finfo(torch.float32).tiny))
    fits = ((q * step - offsets).abs() <= _ON_GRID * step).all(-1)
    todo = ~fits
    for levels in range(_LEVELS - 1, 0, -1):  # the groups left try the narrower spans
        if not todo.any():
            break
        trial_step = span[todo] / levels
        trial_q = torch.round(offsets[todo] / trial_step)
        fits = ((trial_q * trial_step - offsets[todo]).abs() <= _ON_GRID * trial_step).all(-1)
        index = todo.nonzero()[fits]
        step[index[:, 0], index[:, 1]] = trial_step[fits]
        q[index[:, 0], index[:, 1]] = trial_q[fits]
        todo[index[:, 0], index[:, 1]] = False
    if todo.any():
        return None
    return FourBitGroups(q.to(torch.int32).reshape(out_features, in_features), step.squeeze(-1), low.squeeze(-1))


def round_to_four_bits(weight: torch.Tensor) -> FourBitGroups:
    """Nearest 4-bit grid per group of 32, from the group's minimum to its maximum (llama.cpp's Q4_1)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low = groups.amin(-1, keepdim=True)
    step = (groups.amax(-1, keepdim=True) - low) / _LEVELS
    q = torch.round((groups - low) / torch.where(step > 0, step, 1.0)).clamp_(0, _LEVELS)
    return FourBitGroups(q.to(torch.int32).reshape(out_features, in_features), step.squeeze(-1), low.squeeze(-1))


def int4_linear(groups: FourBitGroups, bias: torch.Tensor | None):
    """x (rows, in) fp32 -> x @ w.T + bias (fp32): on the integer kernel (w4a16_matmul.py) where it runs, unless
    KVSERVE_INT4_KERNEL says bf16 or pytorch; else on PyTorch's arithmetic (bf16 in and out)."""
    from engine.models.w4a16_matmul import w4a16_linear  # it packs FourBitGroups, defined here

    if int4_kernel_choice() == "auto" and (linear := w4a16_linear(groups, bias)) is not None:
        return linear
    packed, scales_zeros = _pack(groups)
    out_features, in_features = groups.q.shape
    native = _native_linear(packed, scales_zeros, bias, out_features, in_features)
    if native is not None:
        return native

    def linear(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), packed, GROUP, scales_zeros)
        return y.float() if bias is None else y.float() + bias

    return linear


def _pack(groups: FourBitGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as PyTorch's kernel takes it: packed codes and the (in // GROUP, out, 2) table of (scale,
    zero) in bf16, for w = (q - 8) * scale + zero."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32), 1)
    scales_zeros = torch.stack([groups.step, groups.low + 8 * groups.step], dim=-1).transpose(0, 1)
    return packed, scales_zeros.contiguous().bfloat16()


INT4_KERNELS = ("auto", "bf16", "pytorch")


def int4_kernel_choice() -> str:
    """KVSERVE_INT4_KERNEL: auto (the integer kernel where the CPU has VNNI or AVX2), bf16 (PyTorch's arithmetic on
    kvserve's kernel where it runs) or pytorch (PyTorch's kernel): to compare them, or keep bf16 activations."""
    choice = os.environ.get("KVSERVE_INT4_KERNEL", "auto")
    if choice not in INT4_KERNELS:
        raise ValueError(f"KVSERVE_INT4_KERNEL={choice!r}: choose one of {', '.join(INT4_KERNELS)}")
    return choice


_FEW_ROWS = 4  # up to this many rows, the kernel's entry for decode at small batches; more, its tiled one
_NATIVE_BLOCK_OUT = 64  # output rows per block of PyTorch's AVX-512 layout


def _native_linear(packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int, in_features: int):
    """x (rows, in) fp32 -> fp32 outputs through csrc/int4_gemv.cpp, or None where it cannot serve this weight."""
    if out_features % _NATIVE_BLOCK_OUT or (kernels := _native_kernels()) is None:
        return None
    few_rows, many_rows = kernels
    if bias is not None:
        bias = bias.float().contiguous()
    pointers = (packed.data_ptr(), scales_zeros.data_ptr(), None if bias is None else bias.data_ptr())

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        rows = x.shape[0]
        out = torch.empty(rows, out_features)
        (few_rows if rows <= _FEW_ROWS else many_rows)(out.data_ptr(), x.data_ptr(), *pointers, rows, out_features,
                                                       in_features, GROUP)
        return out

    linear.keep_alive = (packed, scales_zeros, bias)  # the pointers above point into these
    return linear


def _native_kernels():
    """The native kernel's (few-row, many-row) entries where they give PyTorch's bits on this machine, else None."""
    return _native_kernels_or_reason()[0]


def native_kernel_reason() -> str | None:
    """Why int4 matmuls run on PyTorch's kernel here rather than kvserve's, or None where kvserve's runs."""
    return _native_kernels_or_reason()[1]


@functools.cache
def _native_kernels_or_reason():
    from engine import native

    if int4_kernel_choice() == "pytorch":  # to compare the two: the results are the same
        return None, "KVSERVE_INT4_KERNEL=pytorch asks for it"
    if (capability := torch.backends.cpu.get_cpu_capability()) != "AVX512":
        return None, f"PyTorch packs int4 weights in its {capability} layout here; kvserve's kernel reads the AVX-512 one"
    try:
        if not native.load().kvserve_int4_gemv_supported():
            return None, "the kernels were built without AVX-512"
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        kernels = tuple(native.function(symbol, *[pointer] * 5, *[size] * 4)
                        for symbol in ("kvserve_int4_gemv", "kvserve_int4_gemm"))
    except native.KernelUnavailable as error:
        return None, str(error)
    if not _matches_pytorch(*kernels):
        reason = "its results differ from PyTorch's on this machine, so it would make a row's result depend on its batch"
        log.warning("int4 matmuls use PyTorch's kernel only: kvserve's %s", reason)
        return None, reason
    return kernels, None


def _matches_pytorch(few_rows, many_rows) -> bool:
    """Both kernels on random weights and rows of very different scales, 1 to 12 rows at a time: equal bits?"""
    gen = torch.Generator().manual_seed(0)
    out_features, in_features = 2 * _NATIVE_BLOCK_OUT, 4 * GROUP
    packed, scales_zeros = _pack(round_to_four_bits(torch.randn(out_features, in_features, generator=gen)))
    bias = torch.randn(out_features, generator=gen)
    for rows in range(1, 13):
        x = torch.randn(rows, in_features, generator=gen) * torch.logspace(-3, 3, rows).unsqueeze(1)
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, GROUP, scales_zeros).float() + bias
        for kernel in (few_rows, many_rows) if rows <= _FEW_ROWS else (many_rows,):
            got = torch.empty(rows, out_features)
            kernel(got.data_ptr(), x.data_ptr(), packed.data_ptr(), scales_zeros.data_ptr(), bias.data_ptr(), rows,
                   out_features, in_features, GROUP)
            if not torch.equal(got, want):
                return False
    return True
