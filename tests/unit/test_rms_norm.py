"""kvserve's CPU RMSNorm kernel (csrc/rms_norm.cpp) against PyTorch's rms_norm, which it replaces on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import native
from engine.models.layers import RMSNorm, _native_rms_norm


@pytest.fixture(autouse=True)
def kernels_built() -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")


def norm(dim: int, dtype: torch.dtype, eps: float = 1e-5) -> RMSNorm:
    module = RMSNorm(dim, eps)
    module.weight.data = (torch.randn(dim, generator=torch.Generator().manual_seed(dim)) + 1).to(dtype)
    return module


@pytest.mark.parametrize("dim", [576, 8, 100, 2048])
def test_fp32_matches_pytorch(dim: int) -> None:
    module = norm(dim, torch.float32)
    x = torch.randn(5, 3, dim, generator=torch.Generator().manual_seed(1)) * 4
    assert _native_rms_norm(x, module.weight) is not None  # the kernel, not the fallback, is under test
    expected = F.rms_norm(x, (dim,), module.weight, module.eps)
    torch.testing.assert_close(module(x), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [576, 100])
def test_bf16_is_the_bits_of_the_pytorch_lines(dim: int) -> None:
    module = norm(dim, torch.bfloat16)
    x = (torch.randn(7, dim, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    expected = module.weight * F.rms_norm(x.float(), (dim,), None, module.eps).to(torch.bfloat16)
    assert torch.equal(module(x), expected)


def test_a_row_normalises_the_same_alone_and_among_others() -> None:
    module = norm(576, torch.float32)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(3))
    x[::5] *= 100.0
    together = module(x)
    assert all(torch.equal(module(x[i:i + 1]), together[i:i + 1]) for i in range(64))


def test_non_contiguous_input_and_other_dtypes() -> None:
    module = norm(64, torch.float32)
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(4)).t()  # (10, 64), not contiguous
    torch.testing.assert_close(module(x), F.rms_norm(x, (64,), module.weight, module.eps), rtol=2e-6, atol=1e-6)
    assert _native_rms_norm(x.half(), module.weight.half()) is None  # fp16: PyTorch's
    assert _native_rms_norm(x.bfloat16(), module.weight) is None  # weight of another dtype: PyTorch's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [576, 100])
def test_add_and_norm_is_the_add_then_the_norm(dim: int, dtype: torch.dtype) -> None:
    """The fused residual add (a decoder layer's) gives the bits of PyTorch's add, then of the module's forward."""
    module = norm(dim, dtype)
    gen = torch.Generator().manual_seed(5)
    x, residual = (torch.randn(9, dim, generator=gen) * 3).to(dtype), torch.randn(9, dim, generator=gen).to(dtype)
    assert _native_rms_norm(x, module.weight, with_residual=True) is not None
    total, normed = module.add_and_norm(x, residual)
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, module(x + residual))
    assert all(torch.equal(module.add_and_norm(x[i:i + 1], residual[i:i + 1])[1], normed[i:i + 1]) for i in range(9))


def test_add_and_norm_of_a_norm_with_its_own_forward_falls_back() -> None:
    from engine.models.layers import OffsetRMSNorm

    module = OffsetRMSNorm(64, 1e-6)
    module.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(6))
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    total, normed = module.add_and_norm(x, residual)
    assert torch.equal(total, x + residual) and torch.equal(normed, module(x + residual))
