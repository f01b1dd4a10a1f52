"""Tiny random Qwen3, Mistral, Gemma 2, Gemma 3 and Phi-3 models, and GGUF files written as llama.cpp's
converter writes them (its tensor names and metadata keys per arch; Gemma norms stored as 1 + weight).

Windows are short (8 tokens) so test prompts run well past them; every layer kind appears.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

from helpers.tiny_models import randomize

WINDOW = 8
DIMS = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=None)


def _made(model_class, config, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(model_class(config), seed)


def tiny_qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    """head_dim 32, not hidden / heads, as Qwen3's own configs have."""
    return _made(Qwen3ForCausalLM, Qwen3Config(**DIMS, num_hidden_layers=2, head_dim=32,
                                               tie_word_embeddings=False), seed)


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    return _made(MistralForCausalLM, MistralConfig(**DIMS, num_hidden_layers=2, sliding_window=WINDOW), seed)


def tiny_gemma2(seed: int = 0, query_pre_attn_scalar: int = 24) -> Gemma2ForCausalLM:
    """Soft-caps low enough to bite on random weights; 4 layers: sliding, global, sliding, global."""
    config = Gemma2Config(**DIMS, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW,
                          query_pre_attn_scalar=query_pre_attn_scalar, attn_logit_softcapping=2.0,
                          final_logit_softcapping=5.0)
    return _made(Gemma2ForCausalLM, config, seed)


def tiny_gemma3(seed: int = 0, query_pre_attn_scalar: int = 24) -> Gemma3ForCausalLM:
    """6 layers, the fifth-local-then-global pattern; linear RoPE scaling on the global layers."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    config = Gemma3TextConfig(**DIMS, num_hidden_layers=6, head_dim=16, sliding_window=WINDOW,
                              query_pre_attn_scalar=query_pre_attn_scalar, rope_parameters=rope)
    return _made(Gemma3ForCausalLM, config, seed)


def tiny_gemma3_multimodal(seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Gemma 3 as the 4B and larger checkpoints come: a language model beside a (tiny) vision tower."""
    text = tiny_gemma3(seed).config
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=300, boi_token_index=301, eoi_token_index=302)
    return _made(Gemma3ForConditionalGeneration, config, seed)


def tiny_phi3(seed: int = 0, partial_rotary_factor: float = 0.5) -> Phi3ForCausalLM:
    """LongRoPE over an original context of 32 (max 128), rotating part of each 16-dim head."""
    pairs = int(16 * partial_rotary_factor) // 2
    gen = torch.Generator().manual_seed(seed)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial_rotary_factor,
            "short_factor": (1 + torch.rand(pairs, generator=gen)).tolist(),
            "long_factor": (1 + 4 * torch.rand(pairs, generator=gen)).tolist(),
            "original_max_position_embeddings": 32}
    config = Phi3Config(**DIMS, num_hidden_layers=2, rope_parameters=rope, original_max_position_embeddings=32,
                        tie_word_embeddings=False)
    return _made(Phi3ForCausalLM, config, seed)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes these archs ----

_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
}
_GEMMA_BLOCK = {**_BLOCK, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
_ARCH = {"qwen3": "qwen3", "mistral": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def write_family_gguf(model: torch.nn.Module, path: Path) -> str:
    """Write one of this module's models as an F32 GGUF."""
    cfg = model.config
    arch = _ARCH[cfg.model_type]
    gemma = arch.startswith("gemma")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    tensors: list[tuple[str, np.ndarray]] = []
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "phi3":
        rotary_dims = int(head_dim * rope["partial_rotary_factor"])
        original = rope["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / original
        writer.add_rope_dimension_count(rotary_dims)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
        writer.add_sliding_window(cfg.sliding_window or 0)
        tensors += [("rope_factors_long.weight", np.array(rope["long_factor"], np.float32)),
                    ("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))]
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    tensors.append(("token_embd.weight", state.pop("model.embed_tokens.weight").numpy()))
    norm = state.pop("model.norm.weight")
    tensors.append(("output_norm.weight", (norm + 1 if gemma else norm).numpy()))
    lm_head = state.pop("lm_head.weight")
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", lm_head.numpy()))
    table = _GEMMA_BLOCK if gemma else _BLOCK
    for name, value in state.items():
        _, _, layer, rest = name.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        if gemma and part.endswith("norm"):
            value = value + 1  # llama.cpp folds Gemma's (1 + weight) into the stored weight
        if arch == "llama" and part == "self_attn.q_proj":
            from engine.gguf_loader import permute_rotary

            value = permute_rotary(value, cfg.num_attention_heads)
        elif arch == "llama" and part == "self_attn.k_proj":
            from engine.gguf_loader import permute_rotary

            value = permute_rotary(value, cfg.num_key_value_heads)
        tensors.append((f"blk.{layer}.{table[part]}.{kind}", value.numpy()))
    for name, array in tensors:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
