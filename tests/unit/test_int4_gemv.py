"""kvserve's bf16-activation int4 kernel (csrc/int4_gemv.cpp) against PyTorch's packed int4 kernel, which it stands
in for. It runs where the integer kernel (csrc/w4a16_matmul.cpp, test_w4a16_matmul.py) does not: CPUs with AVX-512
but no VNNI, and with KVSERVE_INT4_KERNEL=bf16, which these tests set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.cpu_formats import runs_here

from engine import native
from engine.models.int4_matmul import (
    GROUP,
    _native_kernels,
    int4_linear,
    native_kernel_reason,
    round_to_four_bits,
)

pytestmark = runs_here("int4")

# Where PyTorch packs int4 weights in its AVX-512 layout, kvserve's kernel must run; elsewhere it must stand aside.
AVX512_LAYOUT = torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.fixture(autouse=True)
def kernels_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSERVE_INT4_KERNEL", "bf16")
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")


def grid(out_features: int, in_features: int, seed: int = 0):
    return round_to_four_bits(torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)))


def rows(count: int, in_features: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(count, in_features, generator=torch.Generator().manual_seed(seed))
    x[::2] *= 50.0  # rows of very different scale, as the residual stream has
    return x


def pytorch_int4(groups, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's kernel as int4_linear called it before kvserve's existed."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q, 1)
    scales_zeros = torch.stack([groups.step, groups.low + 8 * groups.step], dim=-1).transpose(0, 1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, GROUP, scales_zeros.contiguous().bfloat16())
    return y.float() if bias is None else y.float() + bias


def test_runs_exactly_where_pytorch_uses_the_avx512_layout() -> None:
    assert (_native_kernels() is not None) == AVX512_LAYOUT
    assert (native_kernel_reason() is None) == AVX512_LAYOUT


@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (64, 32), (192, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_each_output_has_pytorchs_bits(out_features: int, in_features: int, with_bias: bool) -> None:
    groups = grid(out_features, in_features)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(2)) if with_bias else None
    linear = int4_linear(groups, bias)
    for count in (1, 2, 3, 4, 5, 8, 9, 16, 21, 64):  # its few-row entry, then its 8-row tiles and their rest
        x = rows(count, in_features, seed=count)
        assert torch.equal(linear(x), pytorch_int4(groups, x, bias)), f"{count} rows"


def test_a_row_has_the_same_result_in_any_batch() -> None:
    groups = grid(576, 1536)
    linear = int4_linear(groups, None)
    x = rows(64, 1536)
    together = linear(x)
    for size in (1, 2, 3, 4, 5, 7, 8, 13):  # both entries, and tiles of 8 rows cut at other places
        assert all(torch.equal(linear(x[i:i + size]), together[i:i + size]) for i in range(0, 64 - size, 7))


def test_long_rows_have_the_same_bits() -> None:
    groups = grid(64, 9216)  # more inputs than any layer of SmolLM2 (e.g. an 8B model's down projection)
    for count in (1, 3, 9):
        x = rows(count, 9216, seed=count)
        assert torch.equal(int4_linear(groups, None)(x), pytorch_int4(groups, x, None))


def test_shapes_outside_its_layout_and_empty_calls() -> None:
    groups = grid(48, 64)  # out_features not a multiple of 64: PyTorch packs it another way, its kernel runs
    x = rows(3, 64)
    assert torch.equal(int4_linear(groups, None)(x), pytorch_int4(groups, x, None))
    assert int4_linear(grid(128, 64), None)(torch.empty(0, 64)).shape == (0, 128)


def test_pytorchs_kernel_on_request(monkeypatch) -> None:
    from engine.models import int4_matmul

    monkeypatch.setenv("KVSERVE_INT4_KERNEL", "pytorch")
    int4_matmul._native_kernels_or_reason.cache_clear()
    try:
        assert "KVSERVE_INT4_KERNEL" in native_kernel_reason()
        groups = grid(128, 64)
        x = rows(6, 64)
        assert torch.equal(int4_linear(groups, None)(x), pytorch_int4(groups, x, None))
    finally:
        int4_matmul._native_kernels_or_reason.cache_clear()


def test_pytorchs_avx2_layout_keeps_pytorchs_kernel() -> None:
    """As on a CPU without AVX-512: PyTorch packs for AVX2 there, which kvserve's kernel does not read."""
    script = (
        "import torch\n"
        "from engine.models.int4_matmul import int4_linear, native_kernel_reason, round_to_four_bits, GROUP\n"
        "groups = round_to_four_bits(torch.randn(128, 64, generator=torch.Generator().manual_seed(0)))\n"
        "x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))\n"
        "packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q, 1)\n"
        "sz = torch.stack([groups.step, groups.low + 8 * groups.step], -1).transpose(0, 1).contiguous().bfloat16()\n"
        "want = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, GROUP, sz).float()\n"
        "assert torch.equal(int4_linear(groups, None)(x), want)\n"
        "print(native_kernel_reason())\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "KVSERVE_INT4_KERNEL": "bf16"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "AVX2 layout" in done.stdout
