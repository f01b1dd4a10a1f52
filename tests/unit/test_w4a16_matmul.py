"""kvserve's integer int4 kernel (csrc/w4a16_matmul.cpp, csrc/integer_avx2.cpp): 4-bit codes times rows quantized to
16 bits per group of 32, a row's result independent of its batch (VNNI and AMX tiles giving the same bits, and its
AVX2 build the same bits again), and where it runs."""

from __future__ import annotations

import pytest
import torch
from helpers.integer_kernels import (
    ISAS,
    KIND,
    VNNI,
    assert_non_finite_poisons_only_its_row,
    assert_rows_alone_equal_batched,
    rows,
    sixteen_bit_rows,
)

from engine import native
from engine.models.cpu_matmul import rows_cost_arithmetic
from engine.models.int4_matmul import FourBitGroups, int4_linear, round_to_four_bits
from engine.models.w4a16_matmul import w4a16_kind, w4a16_linear

needs_kernel = pytest.mark.skipif(not ISAS, reason="the integer kernel needs AVX-512 VNNI or AVX2; tested to stand "
                                                  "aside below")
each_build = pytest.mark.parametrize("isa", ISAS)


def fp16_grid(out_features: int, in_features: int, seed: int = 0) -> FourBitGroups:
    """A 4-bit grid whose steps and offsets are fp16 values, as a Q4_0/Q4_1 file's are."""
    groups = round_to_four_bits(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))
    return groups._replace(step=groups.step.half().float(), low=groups.low.half().float())


def weight_of(groups: FourBitGroups) -> torch.Tensor:
    return (groups.low.repeat_interleave(32, 1) + groups.q.double() * groups.step.repeat_interleave(32, 1)).double()


def test_runs_where_the_cpu_has_avx512_vnni_or_avx2_and_says_how() -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")
    assert w4a16_kind() == KIND
    assert (w4a16_linear(fp16_grid(32, 64), None) is not None) == bool(ISAS)
    assert (w4a16_linear(fp16_grid(32, 64), None, isa="vnni") is not None) == VNNI


def test_rows_cost_their_arithmetic_only_on_the_avx2_build() -> None:
    # Where they do, speculation checks one draft a step by default (engine/speculative.py: for_kernels).
    assert rows_cost_arithmetic("int4+q8_0") == (KIND == "AVX2")
    assert not rows_cost_arithmetic("fp16") and not rows_cost_arithmetic("q8_0+fp16")


@each_build
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (48, 64), (576, 1536)])
@pytest.mark.parametrize("count", [1, 2, 5, 8, 20, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_computes_the_product_with_16_bit_rows(out_features: int, in_features: int, count: int,
                                                with_bias: bool, isa: str) -> None:
    groups = fp16_grid(out_features, in_features)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(3)) if with_bias else None
    x = rows(count, in_features)
    got = w4a16_linear(groups, bias, isa)(x).double()
    w = weight_of(groups)
    # the offsets meet the row's exact sum; the codes its 16-bit rounding
    low = groups.low.repeat_interleave(32, 1).double()
    want = sixteen_bit_rows(x) @ (w - low).T + x.double() @ low.T + (0 if bias is None else bias.double())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 2e-4  # bf16 rows: ~4e-3


@each_build
def test_a_row_is_the_same_bits_alone_and_in_any_batch(isa: str) -> None:
    linear = w4a16_linear(fp16_grid(192, 1536), torch.randn(192), isa)
    # VNNI tiles below 8 rows, AMX tiles (where present) from 8; prefill chunks of hundreds of rows in one call
    # (the kernel is marked batch_invariant, so matmuls do not cut them into blocks)
    assert linear.batch_invariant
    assert_rows_alone_equal_batched(linear, rows(200, 1536), (2, 3, 4, 5, 7, 8, 9, 16, 17, 40, 70, 129, 200))


@each_build
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_row_holding_inf_or_nan_gives_nan_and_leaves_the_others_alone(isa: str, bad: float) -> None:
    # the codes an inf or a NaN rounds to differ between builds; its group's scale is made NaN instead, so every
    # output of its row is NaN (never finite values from garbage codes) and the other rows keep their bits
    linear = w4a16_linear(fp16_grid(192, 576), torch.randn(192), isa)
    # VNNI, AMX (from 8 rows where present), AVX2's FMA path (from 48 on x86-64-v3)
    assert_non_finite_poisons_only_its_row(linear, 576, (1, 5, 20, 70), column=100, bad=bad)


@pytest.mark.skipif(not VNNI, reason="needs both builds of the kernel: AVX-512 VNNI (and so AVX2)")
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (48, 64), (576, 1536)])
def test_the_avx2_build_gives_the_vnni_builds_bits(out_features: int, in_features: int) -> None:
    # the same exact integer sums, then the same fp32 steps: what an AVX2-only CPU serves is what VNNI serves
    groups = fp16_grid(out_features, in_features)
    bias = torch.randn(out_features)
    vnni, avx2 = w4a16_linear(groups, bias, "vnni"), w4a16_linear(groups, bias, "avx2")
    for count in (1, 2, 3, 4, 5, 9, 33, 70):  # every tile shape of both, AMX's from 8 rows where present
        x = rows(count, in_features, seed=count)
        x[0, :32] = 0.0  # a group of zeros: scale 0
        assert torch.equal(avx2(x), vnni(x)), count


@needs_kernel
def test_the_int4_layers_take_it_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = fp16_grid(64, 64)
    x = rows(3, 64)
    assert torch.equal(int4_linear(groups, None)(x), w4a16_linear(groups, None)(x))
    monkeypatch.setenv("KVSERVE_INT4_KERNEL", "bf16")  # PyTorch's arithmetic: rows rounded to bf16
    assert not torch.equal(int4_linear(groups, None)(x), w4a16_linear(groups, None)(x))
    monkeypatch.setenv("KVSERVE_INT4_KERNEL", "fast")
    with pytest.raises(ValueError, match="KVSERVE_INT4_KERNEL"):
        int4_linear(groups, None)


@needs_kernel
def test_no_rows_and_shapes_it_does_not_take() -> None:
    assert w4a16_linear(fp16_grid(32, 64), None)(torch.empty(0, 64)).shape == (0, 32)
    assert w4a16_linear(round_to_four_bits(torch.randn(40, 64)), None) is None  # outputs not in blocks of 16
