"""GPT-2: LayerNorm, learned positions, GELU (tanh), Conv1D weights stored (in, out)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, attention
from engine.config import ModelConfig
from engine.models.cpu_matmul import Kernel, vocab_projection
from engine.models.family import Family, hf_eos_ids
from engine.models.layers import DirectCall, Linear, set_param

if TYPE_CHECKING:
    from engine.gguf_loader import GGUFMetadata


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class GPT2Attention(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.num_heads = self.num_kv_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.c_attn = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.spec = cfg.attention_spec(index)
        self.k_cache = self.v_cache = torch.empty(0)

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        return q, k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, positions)
        out = attention(q, k, v, self.k_cache, self.v_cache, meta, self.spec)
        return self.c_proj(out.flatten(1))


class GPT2Block(DirectCall, nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.ln_1 = _frozen(nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
        self.attn = GPT2Attention(cfg, index)
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
    """Same interface as DecoderLM (engine/models/decoder.py)."""

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
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_layers))
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

    def missing_weights(self) -> list[str]:
        """Checkpoint names of the parameters loading left unset."""
        return [name for name, p in self.named_parameters() if p.is_meta]

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


# ---- checkpoints ----

def config_from_hf(cfg: dict) -> ModelConfig:
    return ModelConfig(
        arch="gpt2",
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["n_embd"],
        intermediate_size=cfg.get("n_inner") or 4 * cfg["n_embd"],
        num_layers=cfg["n_layer"],
        num_heads=cfg["n_head"],
        num_kv_heads=cfg["n_head"],
        max_position_embeddings=cfg["n_positions"],
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=True,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hf_eos_ids(cfg),
    )


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    num_heads = int(meta.require("attention.head_count"))
    return ModelConfig(
        arch="gpt2", **meta.common(),
        hidden_size=int(meta.require("embedding_length")),
        intermediate_size=int(meta.require("feed_forward_length")),
        num_layers=int(meta.require("block_count")),
        num_heads=num_heads, num_kv_heads=num_heads,
        max_position_embeddings=int(meta.require("context_length")),
        tie_word_embeddings=True,
        norm_eps=float(meta.get("attention.layer_norm_epsilon", 1e-5)),
    )


def gguf_layout(hf_name: str, tensor: torch.Tensor, cfg: ModelConfig, gguf_arch: str) -> torch.Tensor:
    if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return tensor.t()  # llama.cpp stores Conv1D weights as (out, in); HF keeps (in, out)
    return tensor


FAMILY = Family(
    arch="gpt2", model=GPT2LMHeadModel, hf_model_types=("gpt2",), from_hf=config_from_hf,
    gguf_archs=("gpt2",), from_gguf=config_from_gguf,
    gguf_names={"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
                "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
                "output.weight": "lm_head.weight"},
    gguf_block={"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    hf_layers="h", gguf_layout=gguf_layout,
)
