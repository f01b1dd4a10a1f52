"""pin_submodules: submodules found as plain attributes, and reassigning one after pinning still takes effect."""

from __future__ import annotations

import torch
from torch import nn

from engine.models.layers import Linear, RMSNorm, pin_submodules


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = RMSNorm(8, 1e-6)
        self.proj = Linear(8, 8)
        self.inner = nn.Sequential(nn.Identity())


def test_pinned_submodules_are_instance_attributes() -> None:
    block = Block()
    pin_submodules(block)
    assert {"norm", "proj", "inner"} <= set(vars(block))
    assert block.norm is block._modules["norm"] and "0" in vars(block.inner)
    assert [name for name, _ in block.named_modules()] == ["", "norm", "proj", "inner", "inner.0"]  # none twice
    assert set(block.state_dict()) == {"norm.weight", "proj.weight"}


def test_a_module_assigned_after_pinning_replaces_the_pinned_one() -> None:
    block = Block()
    pin_submodules(block)
    replacement = Linear(8, 8)
    block.proj = replacement
    assert block.proj is replacement and block._modules["proj"] is replacement
    x = torch.randn(2, 8)
    replacement.weight.data = torch.eye(8)
    assert torch.equal(block.proj(x), x)
