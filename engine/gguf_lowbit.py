"""Torch decoders for GGUF's low-bit formats: Q2_K, Q3_K (256-value super-blocks) and IQ4_NL, IQ4_XS (a
non-linear 4-bit codebook).

Each takes `raw` (uint8, rows of whole blocks) and returns float32 values with the row shape, computed with
the same float32 operations in the same order as the `gguf` package's numpy reference, so the results are
bitwise equal to gguf.quants.dequantize (tested). Layouts follow ggml's block_q2_K, block_q3_K,
block_iq4_nl and block_iq4_xs structs.
"""

from __future__ import annotations

import functools

import torch

# IQ4's 16 levels: a non-uniform grid, denser near zero where weights cluster (ggml's kvalues_iq4nl).
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


@functools.cache
def _byte_fields(bits: int) -> torch.Tensor:
    """(256, 8 // bits) float32: the `bits`-wide fields of each byte value, lowest first.

    Decoding by looking bytes up in this table takes one gather instead of a shift, mask and cast each.
    """
    shifts = torch.arange(0, 8, bits)
    return ((torch.arange(256).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).float()


@functools.cache
def _iq4_pairs() -> torch.Tensor:
    """(256, 2) float32: the IQ4 levels of a byte's low and high nibble."""
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32)[_byte_fields(4).long()]


def _lookup(table: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """packed (..., n) bytes -> (..., fields, n): the table's fields of each byte, field-major."""
    return table[packed.long()].transpose(-1, -2)


def dequant_q2_k(raw: torch.Tensor) -> torch.Tensor:
    """84 bytes: 16 scale bytes (4-bit scale, 4-bit min per 16 values), 64 bytes of 2-bit values, d, dmin."""
    b = _blocks(raw, 84)
    lead = b.shape[:-1]
    scales, qs = b[..., :16], b[..., 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    scale = (d * (scales & 0x0F).float()).unsqueeze(-1)  # (..., 16, 1)
    low = (dmin * (scales >> 4).float()).unsqueeze(-1)
    # Two halves of 32 bytes; each byte holds four values, 2 bits apart, that lie 32 values apart.
    q = _lookup(_byte_fields(2), qs.unflatten(-1, (2, 32))).reshape(*lead, 16, 16)  # (..., 2, 4, 32) in order
    return (scale * q - low).flatten(-3)


def dequant_q3_k(raw: torch.Tensor) -> torch.Tensor:
    """110 bytes: 32 bytes of high bits, 64 bytes of low 2 bits, 12 bytes of 6-bit scales, d."""
    b = _blocks(raw, 110)
    lead = b.shape[:-1]
    hmask, qs, packed_scales, d = b[..., :32], b[..., 32:96], b[..., 96:108], _f16(b, 108)
    # Scale j's low 4 bits are a nibble of bytes 0-7, its high 2 bits a pair in bytes 8-11.
    low = _lookup(_byte_fields(4), packed_scales[..., :8]).flatten(-2)  # (..., 16)
    high = _lookup(_byte_fields(2), packed_scales[..., 8:]).flatten(-2)
    scales = low + high * 16 - 32  # small integers: exact in float32
    scale = (d * scales).unsqueeze(-1)  # (..., 16, 1)
    q_low = _lookup(_byte_fields(2), qs.unflatten(-1, (2, 32))).reshape(*lead, 16, 16)
    q_high = _lookup(_byte_fields(1), hmask).reshape(*lead, 16, 16)
    # A set high bit means no offset; a clear one subtracts 4 (ggml stores the bit inverted).
    q = q_low - (1 - q_high) * 4
    return (scale * q).flatten(-3)


def dequant_iq4_nl(raw: torch.Tensor) -> torch.Tensor:
    """18 bytes per 32 values: d, then 16 bytes of codebook indices (low nibbles first, then high)."""
    b = _blocks(raw, 18)
    levels = _lookup(_iq4_pairs(), b[..., 2:]).flatten(-2)  # (..., 32)
    return (_f16(b, 0) * levels).flatten(-2)


def dequant_iq4_xs(raw: torch.Tensor) -> torch.Tensor:
    """136 bytes per 256 values: d, 6-bit scale per 32 values (high 2 bits in a u16, low 4 in 4 bytes), indices."""
    b = _blocks(raw, 136)
    d = _f16(b, 0)
    high = _lookup(_byte_fields(2), b[..., 2:4]).transpose(-1, -2).flatten(-2)  # byte i: scales 4i .. 4i+3
    low = _lookup(_byte_fields(4), b[..., 4:8]).transpose(-1, -2).flatten(-2)  # byte i: scales 2i, 2i+1
    scales = low + high * 16 - 32
    scale = (d * scales).unsqueeze(-1)  # (..., 8, 1)
    levels = _lookup(_iq4_pairs(), b[..., 8:].unflatten(-1, (8, 16))).flatten(-2)  # (..., 8, 32)
    return (scale * levels).flatten(-3)
