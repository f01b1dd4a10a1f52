"""What kvserve knows about one architecture, in one place: the `Family` each model file exports.

A family maps its checkpoints' config (config.json or GGUF metadata) onto ModelConfig, names its
weights in both formats, and builds its model, whose layers run their own forward for serving and
for inspection alike. Registering a family is one line in engine/models/__init__.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.config import ModelConfig

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def identity_layout(hf_name: str, tensor: torch.Tensor, cfg: ModelConfig, gguf_arch: str) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Family:
    arch: str  # ModelConfig.arch
    model: Callable[[ModelConfig, int], nn.Module]  # (config, max_positions) -> model, built on meta
    hf_model_types: tuple[str, ...]  # config.json "model_type" values it loads
    from_hf: Callable[[dict], ModelConfig]
    gguf_archs: tuple[str, ...] = ()  # GGUF "general.architecture" values it loads
    from_gguf: Callable[[GGUFMetadata], ModelConfig] | None = None
    gguf_names: dict[str, str] = field(default_factory=dict)  # llama.cpp tensor name -> HF name
    gguf_block: dict[str, str] = field(default_factory=dict)  # llama.cpp block part -> HF part of a layer
    hf_layers: str = "model.layers"  # HF prefix of the decoder layers
    gguf_config_tensors: tuple[str, ...] = ()  # tensors read into the config (rope factors), not weights
    gguf_layout: Callable[[str, torch.Tensor, ModelConfig, str], torch.Tensor] = identity_layout  # llama.cpp -> HF

    def hf_name(self, gguf_name: str) -> str:
        """The HF name of a llama.cpp tensor name; ValueError for one this family does not have."""
        if gguf_name in self.gguf_names:
            return self.gguf_names[gguf_name]
        match = _BLOCK_NAME.fullmatch(gguf_name)
        if match is None or match.group(2) not in self.gguf_block:
            raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file (not part of a {self.arch} model)")
        layer, part, kind = match.groups()
        return f"{self.hf_layers}.{layer}.{self.gguf_block[part]}.{kind}"

    def gguf_name(self, hf_name: str) -> str | None:
        """The llama.cpp name of an HF tensor name (the inverse of hf_name), or None."""
        for gguf_name, name in self.gguf_names.items():
            if name == hf_name:
                return gguf_name
        match = re.fullmatch(rf"{re.escape(self.hf_layers)}\.(\d+)\.(.+)\.(weight|bias)", hf_name)
        if match is not None:
            layer, part, kind = match.groups()
            for gguf_part, name in self.gguf_block.items():
                if name == part:
                    return f"blk.{layer}.{gguf_part}.{kind}"
        return None


def hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config.json of transformers 4 (top-level keys) or 5 (rope_parameters)."""
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), scaling


def hf_eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    return eos if isinstance(eos, list) else ([eos] if eos is not None else [])


def hf_decoder_fields(cfg: dict) -> dict:
    """The ModelConfig fields every Llama-like config.json spells the same way."""
    theta, scaling = hf_rope(cfg)
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        head_dim=cfg.get("head_dim") or 0,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hf_eos_ids(cfg),
        layer_types=cfg.get("layer_types"),
    )


def hf_sliding_window(cfg: dict) -> int | None:
    """The sliding window a config.json turns on (Qwen2/3 keep one that `use_sliding_window` leaves off)."""
    if not cfg.get("use_sliding_window", True):
        return None
    return cfg.get("sliding_window")


def gguf_decoder_fields(meta: GGUFMetadata) -> dict:
    """The ModelConfig fields every Llama-like GGUF spells the same way."""
    hidden, num_heads = int(meta.require("embedding_length")), int(meta.require("attention.head_count"))
    theta = meta.get("rope.freq_base")
    return dict(
        **meta.common(),
        hidden_size=hidden,
        intermediate_size=int(meta.require("feed_forward_length")),
        num_layers=int(meta.require("block_count")),
        num_heads=num_heads,
        max_position_embeddings=int(meta.require("context_length")),
        num_kv_heads=int(meta.get("attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("attention.key_length", hidden // num_heads)),
        norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=10000.0 if theta is None else float(theta),
        tie_word_embeddings=not meta.has_tensor("output.weight"),
        sliding_window=None if meta.get("attention.sliding_window") is None
        else int(meta.get("attention.sliding_window")),
    )
