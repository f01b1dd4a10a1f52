"""Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

Mistral's sliding window (config `sliding_window`) applies to every layer; Qwen2 adds q/k/v biases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, attention
from engine.config import ModelConfig
from engine.models.decoder import DecoderLM
from engine.models.family import Family, gguf_decoder_fields, hf_decoder_fields, hf_sliding_window
from engine.models.layers import DirectCall, Linear, RMSNorm, RotaryEmbedding, residual_add, silu_and_mul

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata


class LlamaAttention(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.rotary = rotary
        self.spec = cfg.attention_spec(index)
        self.k_cache = self.v_cache = torch.empty(0)  # views into the engine's KV tensor, set by the runner

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated q (T, H, D) and k, v (T, KVH, D)."""
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = self.rotary(positions, qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, positions)
        out = attention(q, k, v, self.k_cache, self.v_cache, meta, self.spec)
        return self.o_proj(out.flatten(1))


class GatedMLP(DirectCall, nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused: SwiGLU with SiLU (Llama), GeGLU with GELU-tanh (Gemma)."""

    def __init__(self, cfg: ModelConfig, activation: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation is F.silu:
            return self.down_proj(silu_and_mul(gate_up))  # one native pass on CPU
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)


class LlamaDecoderLayer(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, self_attn: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, normed = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), positions, meta))
        return residual_add(x, self.mlp(normed))


class LlamaForCausalLM(DecoderLM):
    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return LlamaDecoderLayer(cfg, LlamaAttention(cfg, index, self.model.rotary["default"]))


# ---- checkpoints ----

def config_from_hf(cfg: dict) -> ModelConfig:
    model_type = cfg.get("model_type")
    return ModelConfig(arch="llama", **hf_decoder_fields(cfg),
                       attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
                       sliding_window=hf_sliding_window(cfg))


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    return ModelConfig(arch="llama", **gguf_decoder_fields(meta), rope_scaling=meta.rope_scaling(),
                       attention_bias=meta.has_tensor("blk.0.attn_q.bias"))


# llama.cpp's converter interleaves the rotary halves of q/k rows for these (its rope kernel is GPT-J
# style); Qwen2 keeps HF's layout because llama.cpp runs it with NeoX-style rope.
_PERMUTED_ARCHS = ("llama", "mistral")


def unpermute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved (x0, y0, x1, y1, ...) -> halves (x..., y...)."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(num_heads, rows // num_heads // 2, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape)


def permute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter order for q/k rows (the inverse of unpermute_rotary); used to write GGUF."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(num_heads, 2, rows // num_heads // 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape)


def gguf_layout(hf_name: str, tensor: torch.Tensor, cfg: ModelConfig, gguf_arch: str) -> torch.Tensor:
    if gguf_arch in _PERMUTED_ARCHS and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return unpermute_rotary(tensor, cfg.num_heads)
    if gguf_arch in _PERMUTED_ARCHS and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return unpermute_rotary(tensor, cfg.num_kv_heads)
    return tensor


# llama.cpp's names shared by the Llama-like families
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

FAMILY = Family(
    arch="llama", model=LlamaForCausalLM, hf_model_types=("llama", "mistral", "qwen2"), from_hf=config_from_hf,
    gguf_archs=("llama", "mistral", "qwen2"), from_gguf=config_from_gguf, gguf_names=GGUF_NAMES,
    gguf_block=GGUF_BLOCK, gguf_config_tensors=("rope_freqs.weight",), gguf_layout=gguf_layout,
)
