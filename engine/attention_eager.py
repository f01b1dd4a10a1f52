"""The eager attention backend: plain matmul + softmax in fp32 that keeps each layer's weights.

Passed to a model's forward (or one layer's) in place of the paged cache's AttentionMetadata, so the
inspection path runs the model's own layers, whatever the family, and reads the attention weights
(as transformers' attn_implementation="eager" with output_attentions). It never touches the serving
KV cache: keys and values of earlier forwards are kept here, per layer, when `keep_kv` is set.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionSpec


class EagerAttention:
    """One sequence's attention, computed in full; `weights[layer]` is (H, T, S) after each forward."""

    def __init__(self, positions: torch.Tensor, keep_kv: bool = False) -> None:
        self.positions = positions  # (T,) positions of this forward's tokens; set anew for each forward
        self.keep_kv = keep_kv
        self.weights: dict[int, torch.Tensor] = {}
        self._past: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        """q (T, H, D), k/v (T, KVH, D) -> (T, H, D), with the layer's scale, window and soft-capping."""
        if self.keep_kv:
            if spec.layer in self._past:
                past_k, past_v = self._past[spec.layer]
                k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
            self._past[spec.layer] = (k, v)
        group = q.shape[1] // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1)  # (S, H, D)
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * spec.scale  # (H, T, S)
        if spec.softcap is not None:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        key_pos = torch.arange(k.shape[0], device=q.device)[None, None, :]
        query_pos = self.positions[None, :, None]
        hidden = key_pos > query_pos
        if spec.window is not None:
            hidden |= key_pos <= query_pos - spec.window
        weights = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)
        self.weights[spec.layer] = weights
        return torch.einsum("hqk,khd->qhd", weights, v).to(q.dtype)
