"""kvserve's CPU elementwise kernels (csrc/elementwise.cpp) against the PyTorch ops they replace on CPU:
SwiGLU's silu(gate) * up, and the residual add."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.models.layers import residual_add, silu_and_mul


@pytest.fixture(autouse=True)
def kernels_built() -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")


def pytorch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("width", [1536, 40, 7])  # whole vectors, a tail, only a tail
def test_within_a_few_ulp_of_pytorch(width: int) -> None:
    gate_up = torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(width)) * 6
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # the exponential's clamps, and zero
    expected = pytorch(gate_up)
    got = silu_and_mul(gate_up)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-30)


def test_a_row_is_the_same_alone_and_among_others() -> None:
    gate_up = torch.randn(64, 3072, generator=torch.Generator().manual_seed(1)) * 3
    together = silu_and_mul(gate_up)
    assert all(torch.equal(silu_and_mul(gate_up[i:i + 1]), together[i:i + 1]) for i in range(64))


def test_non_contiguous_and_other_dtypes_take_the_pytorch_path() -> None:
    gate_up = torch.randn(96, 8, generator=torch.Generator().manual_seed(2)).t()  # (8, 96), not contiguous
    torch.testing.assert_close(silu_and_mul(gate_up), pytorch(gate_up), rtol=1e-6, atol=1e-30)
    halves = gate_up.bfloat16()
    assert torch.equal(silu_and_mul(halves), pytorch(halves))  # bf16: PyTorch's own lines


@pytest.mark.parametrize("shape", [(1, 576), (64, 576), (3, 7)])
def test_residual_add_is_pytorchs_add(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    x, residual = torch.randn(*shape, generator=gen) * 100, torch.randn(*shape, generator=gen)
    assert torch.equal(residual_add(x, residual), x + residual)
    assert torch.equal(residual_add(x.t(), residual.t()), x.t() + residual.t())  # not contiguous
    assert torch.equal(residual_add(x.double(), residual.double()), x.double() + residual.double())  # PyTorch's
