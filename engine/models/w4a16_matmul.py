"""4-bit weights times 16-bit integer activations (csrc/w4a16_matmul.cpp): the int4 layers' kernel where the CPU
has AVX-512 VNNI, or AVX2 (csrc/integer_avx2.cpp: the same bits).

Each row entering the matmul is quantized to 16 bits per group of 32 inputs (scale = the group's largest
magnitude / 32767, so within 1/65534 of it; PyTorch's int4 kernel rounds each input to bf16, 1/256 of
itself), and a group's products with the 4-bit codes are summed in int32, a byte half at a time: by VNNI,
or from 8 rows by AMX tiles (Intel Sapphire Rapids and later). Integer sums are exact, so the two give the
same sums and a row's result never depends on its batch; the fp32 steps after them (the weight's step and
offset per group, the row's scale and its exact fp32 sum) run in one fixed order per output.

Against PyTorch's arithmetic (int4_matmul.py, csrc/int4_gemv.cpp: two fp32 FMAs a weight) it does ~3x
fewer instructions a weight at one row, which a batch-1 step was bound by, and AMX takes large batches
(README: CPU weight formats; `KVSERVE_INT4_KERNEL=bf16` keeps PyTorch's arithmetic, to compare).

w4a8_linear (`--quantization int4-a8`) multiplies the same packed weights by rows quantized to 8 bits per group
(scale = the largest magnitude / 127, llama.cpp's arithmetic for its Q8 activations): one byte product per weight
instead of two, 1.45-2x faster on AVX2 (csrc/integer_avx2.cpp, the one build for every x86 CPU with AVX2, so the
same bits on each), and lossier (README: CPU weight formats).
"""

from __future__ import annotations

import ctypes

import torch

from engine.models.int4_matmul import FourBitGroups

_BLOCK = 16  # outputs per block of the packed layout


def w4a16_kind() -> str | None:
    """How the kernel multiplies here ("VNNI", "VNNI, AMX from 8 rows" or "AVX2"), or None where it does not run."""
    return _kernel()[1]


def w4a16_linear(groups: FourBitGroups, bias: torch.Tensor | None, isa: str | None = None):
    """x (rows, in) fp32 -> x @ w.T + bias (fp32), or None where the kernel does not run or take this shape; `isa`
    ("vnni", "avx2") asks for one build of the kernel (native.integer_kernel)."""
    return _linear(_kernel(isa)[0], groups, bias)


def w4a8_linear(groups: FourBitGroups, bias: torch.Tensor | None):
    """w4a16_linear's, with the rows quantized to 8 bits (the module docstring); None where the kernel does not run."""
    return _linear(w4a8_kernel(), groups, bias)


def w4a8_kernel():
    """The 8-bit-row kernel (its AVX2 build, for every CPU), or None where it does not run."""
    from engine import native

    return native.integer_kernel("kvserve_w4a8_matmul", *[ctypes.c_void_p] * 6, *[ctypes.c_int64] * 3, isa="avx2")[0]


def _linear(kernel, groups: FourBitGroups, bias: torch.Tensor | None):
    out_features, in_features = groups.q.shape
    if kernel is None or out_features % _BLOCK:
        return None
    codes, steps, lows = _pack(groups)
    if bias is not None:
        bias = bias.float().contiguous()
    pointers = (codes.data_ptr(), steps.data_ptr(), lows.data_ptr(), None if bias is None else bias.data_ptr())

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty(x.shape[0], out_features)
        if x.shape[0]:
            kernel(out.data_ptr(), x.data_ptr(), *pointers, x.shape[0], out_features, in_features)
        return out

    linear.keep_alive = (codes, steps, lows, bias)  # the kernel reads these through their pointers
    linear.batch_invariant = True  # a row's result is the same in any call (the module docstring says why)
    return linear


def _pack(groups: FourBitGroups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (blocks, in / 8, 16, 4) uint8: lane n's byte b of eight inputs 8j.. holds q[n][8j + b] | q[n][8j + 4 + b] << 4;
    steps and lows (blocks, in / 32, 16) fp16: a Q4_0/Q4_1 file's values exactly (they are fp16 there), Q4_K's
    products of two scales rounded (PyTorch's arithmetic rounds all of them to bf16)."""
    q = groups.q.to(torch.uint8).contiguous()
    out_features, in_features = q.shape
    blocks = out_features // _BLOCK
    codes = torch.empty(blocks, in_features // 8, _BLOCK, 4, dtype=torch.uint8)
    _packer()(codes.data_ptr(), q.data_ptr(), out_features, in_features)  # csrc/w4a16_matmul.cpp: one pass

    def by_block(table: torch.Tensor) -> torch.Tensor:
        return table.half().reshape(blocks, _BLOCK, -1).transpose(1, 2).contiguous()

    return codes, by_block(groups.step), by_block(groups.low)


def _packer():
    from engine import native

    return native.function("kvserve_w4a16_pack", *[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 2)


def _kernel(isa: str | None = None):
    from engine import native

    return native.integer_kernel("kvserve_w4a16_matmul", *[ctypes.c_void_p] * 6, *[ctypes.c_int64] * 3, isa=isa)
