"""8-bit weights in groups of 32 with one scale (GGUF Q8_0's layout), on kvserve's integer kernel.

A GGUF often keeps its token embedding, and so a tied LM head, in Q8_0 while the layers are 4-bit
(SmolLM2's Q4_1 file does). At batch 1 that LM head is the largest single read of a step: 49152 x 576
weights, 56 MB in bf16 and 30 MB as the file's 8-bit codes. A GGUF loaded here is dequantized to fp32;
`eight_bit_groups` finds the codes and scales again in those values (q * scale is exact in fp32), so the
kernel multiplies the file's own codes. `auto` uses it for such an LM head where the kernel runs (AVX-512
VNNI: Intel since Cascade Lake, AMD Zen 4); elsewhere the head keeps the float format (bf16 or fp16).

csrc/q8_matmul.cpp quantizes each row to 16 bits per group of 32 (csrc/int8_rows.h) and sums a group's
products in int32, byte half by byte half, with VNNI, or on AMX tiles from 8 rows: integer sums are exact,
so both give the same sums, and the fp32 steps after them are fixed per output. A row's logits are thus
the same bits in any batch, and closer to fp32's than the bf16 head's (README: CPU weight formats).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch

GROUP = 32
_BLOCK = 16  # outputs per block of the packed layout
_CODE_MAX = 127
_SAMPLE_ROWS = 16


class EightBitGroups(NamedTuple):
    q: torch.Tensor  # (out, in) int8 in -127..127
    scale: torch.Tensor  # (out, in // GROUP) fp32: weight = q * scale


def eight_bit_groups(weight: torch.Tensor) -> EightBitGroups | None:
    """The 8-bit grid the weight lies on (every group of 32 is q * scale, |q| <= 127, its largest |q| 127), or None.

    Q8_0's quantizer maps a group's largest magnitude to 127, so the scale is that magnitude / 127, exactly
    (127 * an fp16 scale is exact in fp32). The first rows are tried alone first, so a weight that is not
    on such a grid is turned down without dividing all of it.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % GROUP or weight.shape[0] % _BLOCK:
        return None
    if _grid_of(weight[:_SAMPLE_ROWS]) is None:
        return None
    return _grid_of(weight)


def _grid_of(weight: torch.Tensor) -> EightBitGroups | None:
    groups = weight.reshape(weight.shape[0], -1, GROUP)
    scale = groups.abs().amax(dim=-1) / _CODE_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(groups / safe)
    if not torch.equal(q * safe, groups) or q.abs().max() > _CODE_MAX:
        return None
    return EightBitGroups(q.to(torch.int8).reshape(weight.shape), scale)


def q8_kernel_runs() -> bool:
    """Whether csrc/q8_matmul.cpp runs here (AVX-512 VNNI, else its AVX2 build; the kernels built)."""
    return _kernel()[0] is not None


def q8_kernel_kind() -> str | None:
    """How the kernel multiplies here ("VNNI", "VNNI, AMX from 8 rows" or "AVX2"), or None where it does not run."""
    return _kernel()[1]


def q8_linear(groups: EightBitGroups, isa: str | None = None):
    """x (rows, in) fp32 -> x @ w.T (fp32) through csrc/q8_matmul.cpp (check q8_kernel_runs() first); `isa`
    ("vnni", "avx2") asks for one build of the kernel (native.integer_kernel)."""
    kernel = _kernel(isa)[0]
    if kernel is None:
        raise RuntimeError("the 8-bit kernel does not run here (neither AVX-512 VNNI nor AVX2, or the kernels did "
                           "not build)")
    out_features, in_features = groups.q.shape
    blocks = out_features // _BLOCK
    # codes (blocks, in / 4, 16, 4): each lane four consecutive inputs of one output, as VNNI multiplies them;
    # corrections: the kernel feeds the row's codes + 128 to VNNI's unsigned operand, so 128 * each group's code
    # sum comes off. Both in one pass by csrc/q8_matmul.cpp.
    codes = torch.empty(blocks, in_features // 4, _BLOCK, 4, dtype=torch.int8)
    corrections = torch.empty(blocks, in_features // GROUP, _BLOCK, dtype=torch.int32)
    q = groups.q.to(torch.int8).contiguous()  # held while the kernel reads it
    _packer()(codes.data_ptr(), corrections.data_ptr(), q.data_ptr(), out_features, in_features)
    scales = groups.scale.reshape(blocks, _BLOCK, -1).transpose(1, 2).contiguous()

    def linear(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty(x.shape[0], out_features)
        if x.shape[0]:
            kernel(out.data_ptr(), x.data_ptr(), codes.data_ptr(), scales.data_ptr(), corrections.data_ptr(),
                   x.shape[0], out_features, in_features)
        return out

    linear.keep_alive = (codes, scales, corrections)  # the kernel reads these through their pointers
    return linear


def _packer():
    from engine import native

    return native.function("kvserve_q8_pack", *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 2)


def _kernel(isa: str | None = None):
    from engine import native

    return native.integer_kernel("kvserve_q8_matmul", *[ctypes.c_void_p] * 5, *[ctypes.c_int64] * 3, isa=isa)
