"""kvserve's rotary kernel (csrc/rotary.cpp) gives PyTorch's rotate-half results bit for bit, in one call."""

from __future__ import annotations

import pytest
import torch

from engine import native
from engine.models import layers
from engine.models.layers import RotaryEmbedding


def pytorch_rotary(rotary: RotaryEmbedding, positions: torch.Tensor, qk: torch.Tensor,
                   monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(layers, "_rotary_function", lambda: None)
        rotary._lookup = None
        return rotary(positions, qk)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_the_kernel_gives_pytorchs_bits(scaling: dict | None, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernels should build on the test machines (they have g++): {reason}")
    rotary = RotaryEmbedding(64, 4096, 10000.0, scaling)
    rotary.build(torch.device("cpu"), torch.float32)
    qkv = torch.randn(tokens, 15 * 64, generator=torch.Generator().manual_seed(tokens)) * 30
    qk = qkv[:, :12 * 64].view(tokens, 12, 64)  # q and k heads of the fused projection: rows 960 floats apart
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(1))
    assert layers._rotary_function() is not None and rotary._native(positions, qk) is not None
    got = rotary(positions, qk)
    assert torch.equal(got, pytorch_rotary(rotary, positions, qk, monkeypatch))


def test_what_the_kernel_does_not_take_stays_on_pytorch() -> None:
    partial = RotaryEmbedding(64, 128, 10000.0, None, rotary_dim=32)  # Phi-3's partial rotary
    partial.build(torch.device("cpu"), torch.float32)
    qk = torch.randn(3, 4, 64)
    positions = torch.tensor([0, 1, 2])
    assert partial._native(positions, qk) is None
    bf16 = RotaryEmbedding(64, 128, 10000.0, None)
    bf16.build(torch.device("cpu"), torch.bfloat16)
    assert bf16._native(positions, qk.bfloat16()) is None
    assert bf16(positions, qk.bfloat16()).dtype == torch.bfloat16
