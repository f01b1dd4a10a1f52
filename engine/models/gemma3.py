"""Gemma 3 (text): Gemma 2's layer with q/k norms and no soft-capping; five sliding-window layers per global
one, each kind with its own RoPE (local base 10k unscaled, global base 1M with the config's scaling).

Loads Gemma3ForCausalLM checkpoints (1B) and the language model of Gemma3ForConditionalGeneration ones
(4B and up; the vision tower is skipped, so they serve text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.config import ModelConfig
from engine.models.decoder import DecoderLM
from engine.models.family import Family, gguf_decoder_fields, hf_decoder_fields
from engine.models.gemma2 import (
    GGUF_GEMMA_BLOCK,
    GemmaDecoderLayer,
    alternating,
    gguf_attention_scalar,
    gguf_layout,
)
from engine.models.layers import OffsetRMSNorm, RotaryEmbedding
from engine.models.llama import GGUF_NAMES
from engine.models.qwen3 import QKNormAttention

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata

LOCAL_THETA = 10_000.0
# transformers' Gemma3TextConfig defaults: the Hub's multimodal configs leave these out of text_config
TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                     rms_norm_eps=1e-6)
_MULTIMODAL_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


class Gemma3ForCausalLM(DecoderLM):
    norm_class = OffsetRMSNorm

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.embed_scale = cfg.hidden_size ** 0.5

    def make_rotaries(self, cfg: ModelConfig, max_positions: int) -> dict[str, RotaryEmbedding]:
        local_theta = cfg.rope_local_theta or LOCAL_THETA
        return {"global": RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling),
                "local": RotaryEmbedding(cfg.head_dim, max_positions, local_theta, None)}

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        rotary = self.model.rotary["local" if cfg.is_sliding(index) else "global"]
        return GemmaDecoderLayer(cfg, QKNormAttention(cfg, index, rotary, OffsetRMSNorm))

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Also the multimodal checkpoints' names: their language model's tensors, not the vision tower's."""
        if name.startswith(_VISION_PREFIXES):
            return
        for prefix, replacement in _MULTIMODAL_PREFIXES.items():
            if name.startswith(prefix):
                name = replacement + name.removeprefix(prefix)
        super().load_weight(name, tensor)


def config_from_hf(cfg: dict) -> ModelConfig:
    if cfg.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration: the text part
        top = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in cfg}
        cfg = {**cfg.get("text_config", {}), **top}
    cfg = {**TEXT_DEFAULTS, **cfg}
    fields = hf_decoder_fields(cfg)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers 5: one rope dict per layer type
        full, local = rope["full_attention"], rope.get("sliding_attention", {})
        fields["rope_theta"] = full.get("rope_theta", 1_000_000.0)
        fields["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        local_theta = local.get("rope_theta", LOCAL_THETA)
    else:  # transformers 4 and the Hub: rope_theta, rope_local_base_freq, rope_scaling
        fields["rope_theta"] = cfg.get("rope_theta", 1_000_000.0)
        local_theta = cfg.get("rope_local_base_freq", LOCAL_THETA)
    fields["layer_types"] = fields["layer_types"] or alternating(fields["num_layers"],
                                                                 cfg.get("sliding_window_pattern", 6))
    fields["tie_word_embeddings"] = cfg.get("tie_word_embeddings", True)
    return ModelConfig(arch="gemma3", **fields, attention_bias=cfg.get("attention_bias", False),
                       sliding_window=cfg.get("sliding_window", 4096), rope_local_theta=local_theta,
                       query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
                       attn_softcap=cfg.get("attn_logit_softcapping"),
                       final_softcap=cfg.get("final_logit_softcapping"))


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    fields = gguf_decoder_fields(meta)
    # llama.cpp fixes the pattern (5 local : 1 global) and the local base (10k) for gemma3
    return ModelConfig(arch="gemma3", **fields, layer_types=alternating(fields["num_layers"], 6),
                       rope_scaling=meta.rope_scaling(), rope_local_theta=LOCAL_THETA,
                       query_pre_attn_scalar=gguf_attention_scalar(meta, fields, big_layers=62))


FAMILY = Family(
    arch="gemma3", model=Gemma3ForCausalLM, hf_model_types=("gemma3_text", "gemma3"), from_hf=config_from_hf,
    gguf_archs=("gemma3",), from_gguf=config_from_gguf, gguf_names=GGUF_NAMES,
    gguf_block={**GGUF_GEMMA_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    gguf_layout=gguf_layout,
)
