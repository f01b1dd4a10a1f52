"""Phi-3, Phi-3.5 and Phi-4-mini: the Llama layer, checkpoints already fused (qkv_proj, gate_up_proj),
LongRoPE ("su") scaling with short and long factors, partial rotary (Phi-4-mini rotates 3/4 of each head)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import ModelConfig
from engine.models.family import Family, gguf_decoder_fields, hf_decoder_fields
from engine.models.llama import GGUF_BLOCK, GGUF_NAMES, LlamaForCausalLM

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's layer and forward; only the checkpoints and the rotary scaling differ."""


def config_from_hf(cfg: dict) -> ModelConfig:
    fields = hf_decoder_fields(cfg)
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    partial = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    scaling = fields["rope_scaling"]
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su"):
        scaling = dict(scaling, rope_type="longrope", max_position_embeddings=fields["max_position_embeddings"])
        scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings")
                           or fields["max_position_embeddings"])
    fields["rope_scaling"] = scaling
    return ModelConfig(arch="phi3", **fields, attention_bias=False, sliding_window=cfg.get("sliding_window"),
                       partial_rotary_factor=partial)


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    fields = gguf_decoder_fields(meta)
    fields["sliding_window"] = fields["sliding_window"] or None  # 0: none (Phi-4)
    rotary_dims = int(meta.get("rope.dimension_count", fields["head_dim"]))
    long, short = meta.tensor("rope_factors_long.weight"), meta.tensor("rope_factors_short.weight")
    scaling = None
    if long is not None and short is not None:
        scaling = {"rope_type": "longrope", "long_factor": long.tolist(), "short_factor": short.tolist(),
                   "original_max_position_embeddings": int(meta.require("rope.scaling.original_context_length")),
                   "attention_factor": float(meta.get("rope.scaling.attn_factor", 1.0))}
    return ModelConfig(arch="phi3", **fields, rope_scaling=scaling,
                       partial_rotary_factor=rotary_dims / fields["head_dim"])


FAMILY = Family(
    arch="phi3", model=Phi3ForCausalLM, hf_model_types=("phi3",), from_hf=config_from_hf,
    gguf_archs=("phi3",), from_gguf=config_from_gguf, gguf_names=GGUF_NAMES,
    gguf_block={**GGUF_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    gguf_config_tensors=("rope_factors_long.weight", "rope_factors_short.weight"),
)
