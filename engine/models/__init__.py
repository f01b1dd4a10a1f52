"""Model families, chosen by ModelConfig.arch."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM

_FAMILIES: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def build_model(cfg: ModelConfig, max_positions: int) -> nn.Module:
    """Build the model's skeleton on the meta device: no memory until weights are assigned."""
    import torch

    with torch.device("meta"):
        return _FAMILIES[cfg.arch](cfg, max_positions)
