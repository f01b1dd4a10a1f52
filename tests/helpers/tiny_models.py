"""Tiny random transformers models for loader tests, saved as HF safetensors dirs or as GGUF files.

GGUF files are written the way llama.cpp's converter writes them (names, q/k row permutation for
llama, (out, in) GPT-2 weights, Llama-3 rope as a rope_freqs tensor), so reading them back checks
that kvserve undoes each of those steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from engine.gguf_loader import permute_rotary

# GQA (4 query heads over 2 KV heads); dims are multiples of 32 so Q8_0/Q4_x blocks fit every row.
LLAMA_DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Replace HF's init (tiny weights, zero biases, unit norms) so attention is sharp and every tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm_scale = ("norm" in name or ".ln_" in name or name.startswith("transformer.ln_")) \
                and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm_scale else std * noise)
    return model.eval()


def tiny_llama(tie: bool = False, llama3_rope: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """Llama with GQA; optionally tied embeddings or Llama-3 rope scaling."""
    extra = {"rope_parameters": dict(LLAMA3_ROPE)} if llama3_rope else {}
    config = LlamaConfig(**LLAMA_DIMS, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    return randomize(LlamaForCausalLM(config), seed)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2: Llama plus q/k/v biases, tied embeddings."""
    config = Qwen2Config(**LLAMA_DIMS, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return randomize(Qwen2ForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return randomize(GPT2LMHeadModel(config), seed)


def save_hf(model: torch.nn.Module, path: Path) -> str:
    model.save_pretrained(path)  # safetensors by default
    return str(path)


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' logits (T, V) for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def quantizes(array: np.ndarray, qtype: Q) -> bool:
    """llama.cpp's rule, simplified: 2-D weights whose rows fill whole blocks; norms and biases stay F32."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype != Q.F32 and array.ndim == 2 and array.shape[-1] % block == 0


def roundtrip(model: torch.nn.Module, qtype: Q) -> torch.nn.Module:
    """The model with every tensor that write_gguf quantizes replaced by its quantize-dequantize value."""
    with torch.no_grad():
        for module in model.modules():
            # GPT-2's Conv1D weights are written transposed, so their blocks run along the other axis.
            transposed = isinstance(module, Conv1D)
            for param in module.parameters(recurse=False):
                array = (param.t() if transposed and param.ndim == 2 else param).detach().numpy()
                if quantizes(array, qtype):
                    back = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
                    back = torch.from_numpy(back.reshape(array.shape))
                    param.copy_(back.t() if transposed else back)
    return model


def write_gguf(model: torch.nn.Module, path: Path, qtype: Q = Q.F32,
               vocabulary: Callable[[gguf.GGUFWriter], None] | None = None) -> str:
    """Write an HF Llama, Qwen2 or GPT-2 model as llama.cpp's converter would; `vocabulary` adds tokenizer keys."""
    cfg = model.config
    arch = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[cfg.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    if vocabulary is not None:
        vocabulary(writer)
    else:
        writer.add_bos_token_id(cfg.bos_token_id)
        writer.add_eos_token_id(cfg.eos_token_id)
    if arch == "gpt2":
        tensors = _gpt2_tensors(model, writer)
    else:
        tensors = _llama_tensors(model, writer, permute=arch == "llama")
    for name, array in tensors:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantizes(array, qtype):
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


_LLAMA_PARTS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llama_tensors(model: torch.nn.Module, writer: gguf.GGUFWriter, permute: bool) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    tensors = []
    if rope.get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(rope, head_dim)))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors.append(("token_embd.weight", state.pop("model.embed_tokens.weight").numpy()))
    tensors.append(("output_norm.weight", state.pop("model.norm.weight").numpy()))
    lm_head = state.pop("lm_head.weight")
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", lm_head.numpy()))
    for name, value in state.items():
        _, _, layer, rest = name.split(".", 3)
        part, kind = rest.rsplit(".", 1)
        if permute and part == "self_attn.q_proj":
            value = permute_rotary(value, cfg.num_attention_heads)
        elif permute and part == "self_attn.k_proj":
            value = permute_rotary(value, cfg.num_key_value_heads)
        tensors.append((f"blk.{layer}.{_LLAMA_PARTS[part]}.{kind}", value.numpy()))
    return tensors


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs.weight for Llama 3.x."""
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    old_len, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


_GPT2_PARTS = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gpt2_tensors(model: torch.nn.Module, writer: gguf.GGUFWriter) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    state = {k.removeprefix("transformer."): v.detach() for k, v in model.state_dict().items()}
    wte = state.pop("wte.weight").numpy()
    tensors = [("token_embd.weight", wte), ("position_embd.weight", state.pop("wpe.weight").numpy()),
               ("output_norm.weight", state.pop("ln_f.weight").numpy()),
               ("output_norm.bias", state.pop("ln_f.bias").numpy()),
               ("output.weight", wte)]  # llama.cpp writes the tied head out explicitly
    state.pop("lm_head.weight", None)
    for name, value in state.items():
        _, layer, rest = name.split(".", 2)
        part, kind = rest.rsplit(".", 1)
        if part not in _GPT2_PARTS:
            continue  # causal-mask buffers of older transformers
        if kind == "weight" and part.startswith(("attn.", "mlp.")):
            value = value.t()  # Conv1D (in, out) -> llama.cpp's (out, in)
        tensors.append((f"blk.{layer}.{_GPT2_PARTS[part]}.{kind}", value.numpy()))
    return tensors
