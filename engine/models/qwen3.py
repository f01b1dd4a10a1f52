"""Qwen3 (dense): the Llama layer with a per-head RMSNorm on q and k before RoPE, and no q/k/v bias."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.config import ModelConfig
from engine.models.decoder import DecoderLM
from engine.models.family import Family, gguf_decoder_fields, hf_decoder_fields, hf_sliding_window
from engine.models.layers import RMSNorm, RotaryEmbedding
from engine.models.llama import GGUF_BLOCK, GGUF_NAMES, LlamaAttention, LlamaDecoderLayer

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata


class QKNormAttention(LlamaAttention):
    """q and k normalised per head over head_dim, then rotated (Qwen3; Gemma 3 with its (1 + w) norm)."""

    def __init__(self, cfg: ModelConfig, index: int, rotary: RotaryEmbedding,
                 norm_class: type[RMSNorm] = RMSNorm) -> None:
        super().__init__(cfg, index, rotary)
        self.q_norm = norm_class(cfg.head_dim, cfg.norm_eps)
        self.k_norm = norm_class(cfg.head_dim, cfg.norm_eps)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        qk = self.rotary(positions, torch.cat([q, k], dim=1))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim)


class Qwen3ForCausalLM(DecoderLM):
    def make_layer(self, cfg: ModelConfig, index: int) -> LlamaDecoderLayer:
        return LlamaDecoderLayer(cfg, QKNormAttention(cfg, index, self.model.rotary["default"]))


def config_from_hf(cfg: dict) -> ModelConfig:
    return ModelConfig(arch="qwen3", **hf_decoder_fields(cfg), attention_bias=cfg.get("attention_bias", False),
                       sliding_window=hf_sliding_window(cfg))


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    return ModelConfig(arch="qwen3", **gguf_decoder_fields(meta), rope_scaling=meta.rope_scaling(),
                       attention_bias=meta.has_tensor("blk.0.attn_q.bias"))


FAMILY = Family(
    arch="qwen3", model=Qwen3ForCausalLM, hf_model_types=("qwen3",), from_hf=config_from_hf,
    gguf_archs=("qwen3",), from_gguf=config_from_gguf, gguf_names=GGUF_NAMES,
    gguf_block={**GGUF_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    gguf_config_tensors=("rope_freqs.weight",),
)
