"""The skeleton every Llama-like family shares: embed -> decoder layers -> final norm -> LM head.

Parameters carry Hugging Face names (model.embed_tokens, model.layers.N...., model.norm, lm_head),
except that q/k/v and gate/up are fused into one matrix each (`qkv_proj`, `gate_up_proj`) so a layer
does two big matmuls instead of five small ones. A family subclasses `DecoderLM` and says how to
build one layer (`make_layer`), its norms and its rotary tables; the layer's forward is the family's.

Model interface (the runner, the inspection path and the embeddings path rely on it):
- forward(ids, positions, backend) -> hidden (T, hidden): embed(), then run_layers(), each of `layers` in order;
- final_norm(hidden) -> the final hidden states; compute_logits(hidden) -> (N, vocab) fp32 logits.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.models.cpu_matmul import Kernel, vocab_projection
from engine.models.layers import Linear, RMSNorm, RotaryEmbedding, set_param
from engine.models.q8_matmul import EightBitGroups


class DecoderLM(nn.Module):
    """A decoder-only LM with HF parameter names; subclasses give `make_layer` (and maybe the rest)."""

    norm_class: type[RMSNorm] = RMSNorm
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)

    # HF name fragment -> (fused parameter fragment, which slice)
    FUSED = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", 1),
        "self_attn.v_proj": ("self_attn.qkv_proj", 2),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", 1),
    }
    _FUSED_SLOTS = [("self_attn.qkv_proj.weight", i) for i in range(3)] + [("mlp.gate_up_proj.weight", i)
                                                                          for i in range(2)]

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self._fused_loaded: set[tuple[str, int]] = set()
        self.model = nn.Module()
        # Passing the (meta) weight skips the random init, which on meta costs ~2 s of first-use tracing.
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                               _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.rotary = nn.ModuleDict(self.make_rotaries(cfg, max_positions))
        self.model.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = self.norm_class(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.lm_head_kernel: Kernel | None = None  # set by cpu_matmul.pack_linears
        self.lm_head_grid: EightBitGroups | None = None  # a Q8_0 head's codes, when the converted copy kept them

    # ---- what a family describes ----

    def make_rotaries(self, cfg: ModelConfig, max_positions: int) -> dict[str, RotaryEmbedding]:
        """Rotary tables by name; one, "default", unless layers differ (Gemma 3: "local" and "global")."""
        rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        return {"default": RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, rotary_dim)}

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        raise NotImplementedError

    # ---- the forward pass ----

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:  # in the weights' dtype, as transformers rounds it
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.run_layers(self.embed(input_ids, positions), positions, meta)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decoder layers over embedded tokens x (T, hidden) (engine/decode_graph.py records this pass)."""
        for layer in self.model.layers:
            x = layer(x, positions, meta)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32 for stable sampling (soft-capped where the family says)."""
        logits = vocab_projection(self.model.norm(hidden), self.lm_head_weight, self.lm_head_kernel).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---- loading ----

    def missing_weights(self) -> list[str]:
        """Checkpoint names of what loading left unset: whole parameters, or slices of a fused one."""
        missing = [name for name, p in self.named_parameters() if p.is_meta]
        if self._fused_loaded:  # empty when fused tensors came whole (Phi-3, the converted copy)
            expected = {(f"model.layers.{i}.{part}", index) for i in range(self.config.num_layers)
                        for part, index in self._FUSED_SLOTS}
            missing += [_unfused_name(name, index) for name, index in sorted(expected - self._fused_loaded)
                        if name not in missing]
        return missing

    def post_load(self, device: torch.device, dtype: torch.dtype) -> None:
        missing = self.missing_weights()
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        for rotary in self.model.rotary.values():
            rotary.build(device, dtype)

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Take one tensor under its Hugging Face name (e.g. model.layers.0.self_attn.q_proj.weight)."""
        if name.endswith("rotary_emb.inv_freq"):
            return
        if name == "lm_head.weight" and self.lm_head is None:
            return  # tied: the embedding serves as LM head
        for hf_part, (fused_part, index) in self.FUSED.items():
            if f".{hf_part}." in name:
                self._load_fused(name.replace(hf_part, fused_part), index, tensor)
                return
        module_name, _, param = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint") from None
        if param not in module._parameters:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint")
        set_param(module, param, tensor)

    def _load_fused(self, name: str, index: int, tensor: torch.Tensor) -> None:
        module_name, _, param = name.rpartition(".")
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"unexpected tensor {_unfused_name(name, index)!r} in checkpoint") from None
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


def _unfused_name(fused_name: str, index: int) -> str:
    """The checkpoint's name of one slice of a fused parameter (qkv_proj part 1 -> k_proj)."""
    for hf_part, (fused_part, slot) in DecoderLM.FUSED.items():
        if slot == index and fused_part in fused_name:
            return f"{fused_name.replace(fused_part, hf_part)} (part of {fused_name})"
    return f"{fused_name} part {index}"
