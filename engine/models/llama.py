"""Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

Parameters carry Hugging Face names, except that q/k/v and gate/up are fused into one matrix
each (`qkv_proj`, `gate_up_proj`) so a layer does two big matmuls instead of five small ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.models.cpu_matmul import Kernel, vocab_projection
from engine.models.layers import Linear, RMSNorm, RotaryEmbedding, set_param


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)  # views into the engine's KV tensor, set by the runner

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotated q (T, H, D) and k, v (T, KVH, D); shared with the inspection path."""
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = self.rotary(positions, qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, positions)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        # Passing the (meta) weight skips the random init, which on meta costs ~2 s of first-use tracing.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(ids, positions, meta) -> hidden (T, hidden); compute_logits(hidden) -> (N, vocab)."""

    # HF name fragment -> (fused parameter fragment, which slice)
    _FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }

    _FUSED_SLOTS = [("self_attn.qkv_proj.weight", i) for i in range(3)] + [("mlp.gate_up_proj.weight", i) for i in range(2)]

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self._fused_loaded: set[tuple[str, int]] = set()
        self.model = LlamaModel(cfg, max_positions)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.lm_head_kernel: Kernel | None = None  # set by cpu_matmul.pack_linears

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids, positions)
        for layer in self.model.layers:
            x = layer(x, positions, meta)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32 for stable sampling."""
        return vocab_projection(self.model.norm(hidden), self.lm_head_weight, self.lm_head_kernel).float()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def post_load(self, device: torch.device, dtype: torch.dtype) -> None:
        expected = {(f"model.layers.{i}.{part}", index) for i in range(self.config.num_layers)
                    for part, index in self._FUSED_SLOTS}
        missing = sorted(expected - self._fused_loaded)
        if self._fused_loaded and missing:  # empty when the fused tensors were assigned whole (converted copy)
            raise ValueError(f"checkpoint is missing {len(missing)} q/k/v or gate/up tensors, e.g. {missing[0]}")
        self.model.rotary.build(device, dtype)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Take one tensor under its Hugging Face name (e.g. model.layers.0.self_attn.q_proj.weight)."""
        if name.endswith("rotary_emb.inv_freq"):
            return
        if name == "lm_head.weight" and self.lm_head is None:
            return  # tied: the embedding serves as LM head
        for hf_part, (fused_part, index) in self._FUSED.items():
            if hf_part in name:
                self._load_fused(name.replace(hf_part, fused_part), index, tensor)
                return
        module_name, _, param = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint") from None
        set_param(module, param, tensor)

    def _load_fused(self, name: str, index: int, tensor: torch.Tensor) -> None:
        module_name, _, param = name.rpartition(".")
        module = self.get_submodule(module_name)
        fused = module._parameters[param]
        if "qkv_proj" in name:
            attn = self.model.layers[0].self_attn
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            sizes = [self.config.intermediate_size] * 2
        if fused.is_meta:
            fused = torch.empty(fused.shape, dtype=tensor.dtype, device=tensor.device)
            set_param(module, param, fused)
            fused = module._parameters[param]
        start = sum(sizes[:index])
        if tensor.shape[0] != sizes[index] or tensor.shape[1:] != fused.shape[1:]:
            raise ValueError(f"shape mismatch for {name} part {index}: expected "
                             f"{(sizes[index], *fused.shape[1:])}, checkpoint has {tuple(tensor.shape)}")
        fused.data[start:start + sizes[index]].copy_(tensor)
        self._fused_loaded.add((name, index))
