"""kvserve's 8-bit kernel (csrc/q8_matmul.cpp) for a Q8_0 LM head: the file's codes found again, rows quantized
to 16 bits per group of 32, and a row's result independent of its batch (VNNI and AMX tiles giving the same bits, and
its AVX2 build, csrc/integer_avx2.cpp, the same bits again)."""

from __future__ import annotations

import pytest
import torch
from helpers.integer_kernels import (
    ISAS,
    KIND,
    VNNI,
    assert_non_finite_poisons_only_its_row,
    rows,
    sixteen_bit_rows,
)

from engine import native
from engine.models.q8_matmul import GROUP, EightBitGroups, eight_bit_groups, q8_kernel_kind, q8_linear

needs_kernel = pytest.mark.skipif(not ISAS, reason="the 8-bit kernel needs AVX-512 VNNI or AVX2; tested to stand "
                                                  "aside below")
each_build = pytest.mark.parametrize("isa", ISAS)


def q8_0(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, EightBitGroups]:
    """A weight as llama.cpp's Q8_0 quantizer stores it (fp16 scale = max |w| / 127 per group), dequantized."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    w[0, :GROUP] = 0.0  # an all-zero group: scale 0
    groups = w.reshape(out_features, -1, GROUP)
    scale = (groups.abs().amax(-1) / 127).half().float()
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp(-127, 127)
    dequantized = (q * scale.unsqueeze(-1)).reshape(out_features, in_features)
    return dequantized, EightBitGroups(q.to(torch.int8).reshape(out_features, in_features), scale)


def test_finds_the_files_codes_and_scales_again() -> None:
    w, stored = q8_0(64, 96)
    found = eight_bit_groups(w)
    assert found is not None
    assert torch.equal(found.q, stored.q) and torch.equal(found.scale, stored.scale)


@pytest.mark.parametrize("weight", [torch.randn(64, 96), q8_0(64, 96)[0] + 1e-4 * torch.randn(64, 96), q8_0(40, 96)[0],
                                    q8_0(64, 96)[0][:, :80], q8_0(64, 96)[0].half()],
                         ids=["float", "off-by-a-little", "rows-not-16s", "cols-not-32s", "fp16"])
def test_turns_down_weights_not_on_an_8_bit_grid_or_of_other_shapes(weight: torch.Tensor) -> None:
    assert eight_bit_groups(weight) is None


def test_runs_where_the_cpu_has_avx512_vnni_or_avx2_and_says_how() -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")
    assert q8_kernel_kind() == KIND
    if not VNNI:
        with pytest.raises(RuntimeError, match="VNNI"):
            q8_linear(q8_0(16, 32)[1], isa="vnni")


@each_build
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 96), (256, 576), (48, 1536)])
@pytest.mark.parametrize("count", [1, 3, 8, 20, 64])
def test_computes_the_product_with_16_bit_rows(out_features: int, in_features: int, count: int, isa: str) -> None:
    w, groups = q8_0(out_features, in_features)
    x = rows(count, in_features)
    got = q8_linear(groups, isa)(x).double()
    want = sixteen_bit_rows(x) @ w.double().T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    exact = x.double() @ w.double().T  # and the rows' rounding is far below bf16's (~4e-3 of a value)
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 2e-4


@each_build
def test_a_row_is_the_same_bits_alone_and_in_any_batch(isa: str) -> None:
    w, groups = q8_0(256, 576)
    linear = q8_linear(groups, isa)
    x = rows(70, 576)
    alone = torch.cat([linear(row) for row in x.split(1)])
    for count in (2, 3, 5, 7, 8, 9, 16, 17, 40, 70):  # VNNI tiles below 8 rows, AMX tiles (where present) from 8
        batched = torch.cat([linear(part) for part in x.split(count)])
        assert torch.equal(batched, alone), count


@each_build
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_row_holding_inf_or_nan_gives_nan_and_leaves_the_others_alone(isa: str, bad: float) -> None:
    # as the 4-bit kernel's test: a NaN once came out as finite values, different in each build
    _, groups = q8_0(256, 576)
    assert_non_finite_poisons_only_its_row(q8_linear(groups, isa), 576, (1, 5, 20), column=300, bad=bad)


@pytest.mark.skipif(not VNNI, reason="needs both builds of the kernel: AVX-512 VNNI (and so AVX2)")
def test_the_avx2_build_gives_the_vnni_builds_bits() -> None:
    _, groups = q8_0(256, 576)
    groups.q[1, :32] = -128  # the extreme code (Q8_0 files stop at -127) and the extreme row codes below
    vnni, avx2 = q8_linear(groups, "vnni"), q8_linear(groups, "avx2")
    for count in (1, 2, 3, 4, 5, 9, 33):
        x = rows(count, 576, seed=count)
        x[0, 32:64] = -x[0, 32:64].abs().max()  # every code of the group -32767
        assert torch.equal(avx2(x), vnni(x)), count


@needs_kernel
def test_no_rows_and_strided_rows() -> None:
    _, groups = q8_0(32, 64)
    linear = q8_linear(groups)
    assert linear(torch.empty(0, 64)).shape == (0, 32)
    x = rows(4, 128)[:, ::2]  # not contiguous
    assert torch.equal(linear(x), linear(x.contiguous()))
