"""4-bit weights: groups of 32 with a scale and an offset (GGUF Q4_1's layout) on PyTorch's packed int4 kernel.

Batch-1 decode on a CPU reads every weight once per token, so its speed is the bytes read: 4.5 bits a
weight instead of fp16's 16. SmolLM2's GGUF stores its layers in Q4_1 (value = d * q + m, q in 0..15,
per group of 32), and a GGUF loaded here is dequantized to fp32; `four_bit_groups` finds that grid again
in the fp32 values, so `auto` keeps those weights 4-bit without rounding them a second time. A weight
that is not on such a grid (an fp16/bf16 checkpoint, Q8_0 or Q6_K tensors) stays in the float format,
unless `--quantization int4` asks for it: then it is rounded to the nearest grid as llama.cpp's Q4_1
quantizer does (lossy).

The kernel, `_weight_int4pack_mm_for_cpu`, computes with bf16 activations (it is fast only in bf16; fp16
and fp32 inputs run a scalar path ~50x slower): each row rounded to bf16 on the way in, its sums in fp32,
the result rounded to bf16. Scales and offsets are bf16 too. It computes w = (q - 8) * scale + zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
    """x (rows, in) fp32 -> x @ w.T + bias through the packed int4 kernel (bf16 in and out, returned as fp32)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32), 1)
    # The kernel's (in // GROUP, out, 2) table of (scale, zero), for w = (q - 8) * scale + zero.
    scales_zeros = torch.stack([groups.step, groups.low + 8 * groups.step], dim=-1).transpose(0, 1)
    scales_zeros = scales_zeros.contiguous().bfloat16()

    def linear(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), packed, GROUP, scales_zeros)
        return y.float() if bias is None else y.float() + bias

    return linear
