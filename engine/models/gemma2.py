"""Gemma 2: embeddings scaled by sqrt(hidden), RMSNorm with (1 + weight), norms before and after both
attention and MLP, GELU-tanh gated MLP, attention and final logit soft-capping, query_pre_attn_scalar,
sliding-window and global layers alternating (even layers slide).

llama.cpp's converter stores the norms' weights with the 1 already added; loading subtracts it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.decoder import DecoderLM
from engine.models.family import Family, gguf_decoder_fields, hf_decoder_fields
from engine.models.layers import DirectCall, OffsetRMSNorm
from engine.models.llama import GGUF_BLOCK, GGUF_NAMES, GatedMLP, LlamaAttention

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GemmaDecoderLayer(DirectCall, nn.Module):
    """x + post_norm(attn(pre_norm(x))), then x + post_norm(mlp(pre_norm(x))) (Gemma 2 and 3)."""

    def __init__(self, cfg: ModelConfig, self_attn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg, gelu_tanh)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2ForCausalLM(DecoderLM):
    norm_class = OffsetRMSNorm

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.embed_scale = cfg.hidden_size ** 0.5

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return GemmaDecoderLayer(cfg, LlamaAttention(cfg, index, self.model.rotary["default"]))


def alternating(num_layers: int, pattern: int) -> list[str]:
    """Every `pattern`-th layer global, the others sliding (transformers' and llama.cpp's rule)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def config_from_hf(cfg: dict) -> ModelConfig:
    fields = hf_decoder_fields(cfg)
    fields["layer_types"] = fields["layer_types"] or alternating(fields["num_layers"], 2)
    fields["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    return ModelConfig(arch="gemma2", **fields, attention_bias=cfg.get("attention_bias", False),
                       sliding_window=cfg.get("sliding_window", 4096),
                       query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
                       attn_softcap=cfg.get("attn_logit_softcapping"),
                       final_softcap=cfg.get("final_logit_softcapping"))


def gguf_attention_scalar(meta: GGUFMetadata, fields: dict, big_layers: int) -> float:
    """llama.cpp keeps no query_pre_attn_scalar: it scales by head_dim, or hidden / heads for the 27B."""
    if fields["num_layers"] == big_layers:
        return fields["hidden_size"] / fields["num_heads"]
    return fields["head_dim"]


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    fields = gguf_decoder_fields(meta)
    return ModelConfig(arch="gemma2", **fields, layer_types=alternating(fields["num_layers"], 2),
                       query_pre_attn_scalar=gguf_attention_scalar(meta, fields, big_layers=46),
                       attn_softcap=meta.get("attn_logit_softcapping"),
                       final_softcap=meta.get("final_logit_softcapping"))


def gguf_layout(hf_name: str, tensor: torch.Tensor, cfg: ModelConfig, gguf_arch: str) -> torch.Tensor:
    return tensor - 1.0 if hf_name.endswith("norm.weight") else tensor  # llama.cpp stores 1 + weight


GGUF_GEMMA_BLOCK = {
    **{k: v for k, v in GGUF_BLOCK.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

FAMILY = Family(
    arch="gemma2", model=Gemma2ForCausalLM, hf_model_types=("gemma2",), from_hf=config_from_hf,
    gguf_archs=("gemma2",), from_gguf=config_from_gguf, gguf_names=GGUF_NAMES, gguf_block=GGUF_GEMMA_BLOCK,
    gguf_layout=gguf_layout,
)
