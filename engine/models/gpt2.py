"""GPT-2: LayerNorm, learned positions, GELU (tanh), Conv1D weights stored (in, out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.config import ModelConfig
from engine.models.cpu_matmul import Kernel, vocab_projection
from engine.models.layers import Linear, set_param


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.scale = self.head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, positions)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return self.c_proj(out.flatten(1))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = _frozen(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
        self.attn = GPT2Attention(cfg)
        self.ln_2 = _frozen(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
        self.c_fc = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.c_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    @property
    def self_attn(self) -> GPT2Attention:
        return self.attn

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, meta)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2LMHeadModel(nn.Module):
    """Same interface as LlamaForCausalLM."""

    # Conv1D layers keep (in, out) weights in HF checkpoints; nn.Linear wants (out, in).
    _TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        # Passing the (meta) weights skips the random init, which on meta costs ~2 s of first-use tracing.
        self.wte = _frozen(nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                        _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)))
        self.wpe = _frozen(nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size,
                                        _weight=torch.empty(cfg.max_position_embeddings, cfg.hidden_size)))
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = _frozen(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
        self.lm_head_kernel: Kernel | None = None  # set by cpu_matmul.pack_linears

    @property
    def layers(self) -> nn.ModuleList:
        return self.h

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) + self.wpe(positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed(input_ids, positions)
        for block in self.h:
            x = block(x, positions, meta)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_projection(self.ln_f(hidden), self.wte.weight, self.lm_head_kernel).float()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def post_load(self, device: torch.device, dtype: torch.dtype) -> None:
        pass  # nothing to derive: GPT-2 has no rotary tables

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Take one tensor under its HF name (with or without the `transformer.` prefix)."""
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            return  # tied head; causal-mask buffers
        if name.endswith(self._TRANSPOSED):
            tensor = tensor.t().contiguous()
        name = name.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj.")
        module_name, _, param = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint") from None
        set_param(module, param, tensor)
