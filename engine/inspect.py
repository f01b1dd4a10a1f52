"""Attention capture and logit lens on an eager path, for one sequence at a time.

The model's own layers run one by one with the eager attention backend (engine/attention_eager.py):
plain matmul + softmax in fp32 instead of the paged kernel, so the weights can be read, for every
family alike. Nothing here
touches the serving KV cache, and no module is modified, so it can run beside the engine loop.
Results are plain Python lists and dicts, ready for JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention_eager import EagerAttention

# A selection of layers, heads or positions: None or "all", "last", an index, a list, or "start:stop".
Selection = None | int | str | list[int]
Aggregate = Literal["none", "mean", "max"]
LENS_CHUNK = 128  # positions per LM-head matmul: (128, vocab) fp32 is ~25 MB for a 49k vocabulary


class InspectionTooLong(ValueError):
    """The sequence is longer than the inspection token limit."""


class InspectionTooLarge(ValueError):
    """The response would be larger than the inspection byte limit."""


@dataclass(frozen=True)
class InspectLimits:
    max_tokens: int = 256  # prompt plus generated tokens
    max_bytes: int = 64 << 20  # estimated JSON size of a response


@dataclass(frozen=True)
class AttentionQuery:
    """What to return from POST /v1/attention (see `Inspector.attention`)."""

    layers: Selection = None
    heads: Selection = None
    query_positions: Selection = None
    aggregate: Aggregate = "none"
    top_k: int = 5
    precision: int = 4  # decimals of returned weights
    include_weights: bool = True
    thumbnail_size: int = 0  # >0: also return each head's map max-pooled to at most this many rows and columns


@dataclass(frozen=True)
class LensQuery:
    """What to return from POST /v1/logit_lens."""

    layers: Selection = None
    positions: Selection = None
    top_k: int = 5
    precision: int = 4


@dataclass
class Tokens:
    """The inspected sequence: ids with their text pieces and character offsets into `text`."""

    ids: list[int]
    text: str
    spans: list[dict] = field(default_factory=list)  # {id, text, start, end}
    num_prompt_tokens: int = 0


def select(spec: Selection, count: int, what: str) -> list[int]:
    """Resolve a selection against `count` items into sorted, distinct, non-negative indices."""
    if spec is None or spec == "all":
        return list(range(count))
    if spec == "last":
        return [count - 1]
    if isinstance(spec, str):
        start, sep, stop = spec.partition(":")
        try:
            if not sep:
                raise ValueError
            picked = list(range(count))[slice(int(start) if start else None, int(stop) if stop else None)]
        except ValueError:
            raise ValueError(f"{what}: {spec!r} is not 'all', 'last', an index, a list or 'start:stop'") from None
        if not picked:
            raise ValueError(f"{what}: range {spec!r} selects nothing out of {count}")
        return picked
    indices = [spec] if isinstance(spec, int) else list(spec)
    if not indices:
        raise ValueError(f"{what}: the list is empty")
    bad = [i for i in indices if not -count <= i < count]
    if bad:
        raise ValueError(f"{what}: index {bad[0]} is out of range (there are {count})")
    return sorted({i % count for i in indices})


# ---- the eager forward pass --------------------------------------------------------------------

def eager_layers(model: nn.Module, ids: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run `ids` through the model's own layers with the eager attention backend.

    Yields (attention weights (H, T, T) fp32, hidden (T, hidden)) per layer.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor(ids, device=device)
    positions = torch.arange(len(ids), device=device)
    backend = EagerAttention(positions)
    # No inference_mode here: a grad-mode context held across `yield` would leak into the caller.
    x = model.embed(input_ids, positions)
    for index, layer in enumerate(model.layers):
        x = layer(x, positions, backend)
        yield backend.weights.pop(index), x


def greedy_generate(model: nn.Module, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation of `ids` with the eager backend's own KV; stops after a token in `stop_ids`."""
    device = next(model.parameters()).device
    backend = EagerAttention(torch.empty(0), keep_kv=True)
    new: list[int] = []
    step_ids, start = list(ids), 0
    with torch.inference_mode():
        while len(new) < max_new_tokens:
            backend.positions = torch.arange(start, start + len(step_ids), device=device)
            hidden = model(torch.tensor(step_ids, device=device), backend.positions, backend)
            token = int(model.compute_logits(hidden[-1:]).argmax(-1))
            new.append(token)
            if token in stop_ids:
                break
            start += len(step_ids)
            step_ids = [token]
    return new


# ---- requests ------------------------------------------------------------------------------------

def _rounded(values: torch.Tensor, precision: int) -> list:
    # Round in float64 so the JSON shows 0.1234, not float32's 0.12340000271797180.
    return values.double().round(decimals=precision).tolist()


class Inspector:
    """Attention and logit-lens reports for one model; stateless, safe beside the serving loop."""

    def __init__(self, model: nn.Module, tokenizer, max_model_len: int, stop_ids: set[int],
                 limits: InspectLimits | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len, self.stop_ids = max_model_len, stop_ids
        self.limits = limits or InspectLimits()
        cfg = model.config
        self.facts = {"arch": cfg.arch, "layers": cfg.num_layers, "heads": cfg.num_heads,
                      "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}

    @classmethod
    def from_engine(cls, engine, limits: InspectLimits | None = None) -> Inspector:
        """Share the weights and tokenizer of a running LLMEngine."""
        return cls(engine.model, engine.tokenizer, engine.max_model_len, set(engine.eos_token_ids), limits)

    def tokens(self, prompt: str | list[int], max_new_tokens: int = 0, add_special_tokens: bool = True) -> Tokens:
        """Tokenize (and greedily extend) the prompt, enforcing the token limit."""
        if isinstance(prompt, str):
            triples = self.tokenizer.encode_with_offsets(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        else:
            vocab = self.facts["vocab_size"]
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
            triples, text = self._append_pieces([], "", prompt)
        if not triples:
            raise ValueError("the prompt is empty")
        limit = min(self.limits.max_tokens, self.max_model_len)
        total = len(triples) + max_new_tokens
        if total > limit:
            raise InspectionTooLong(f"inspection is limited to {limit} tokens (inspect_max_tokens), but "
                                    f"{total} were requested ({len(triples)} in the prompt, {max_new_tokens} to generate)")
        ids = [t for t, _, _ in triples]
        num_prompt = len(ids)
        if max_new_tokens:
            triples, text = self._append_pieces(triples, text, greedy_generate(self.model, ids, max_new_tokens,
                                                                                 self.stop_ids))
            ids = [t for t, _, _ in triples]
        spans = [{"id": t, "text": self.tokenizer.token_text(t), "start": s, "end": e} for t, s, e in triples]
        return Tokens(ids, text, spans, num_prompt)

    def _append_pieces(self, triples: list, text: str, ids: list[int]) -> tuple[list, str]:
        # Token-id input and generated tokens: offsets index the concatenation of their text pieces.
        triples = list(triples)
        for token in ids:
            piece = self.tokenizer.token_text(token)
            triples.append((token, len(text), len(text) + len(piece)))
            text += piece
        return triples, text

    @torch.inference_mode()
    def attention(self, toks: Tokens, query: AttentionQuery) -> dict:
        """Softmax attention weights as [layer][head][query][key] plus entropy, top-k keys and thumbnails."""
        n = len(toks.ids)
        layers = select(query.layers, self.facts["layers"], "layers")
        heads = select(query.heads, self.facts["heads"], "heads")
        queries = select(query.query_positions, n, "query_positions")
        out_heads = 1 if query.aggregate != "none" else len(heads)
        thumb = min(query.thumbnail_size, n) if query.thumbnail_size else 0
        number = query.precision + 4  # "0.1234," - zeros are shorter, so this overestimates
        estimate = len(layers) * out_heads * (
            len(queries) * n * number * query.include_weights + len(queries) * query.top_k * (number + 8)
            + thumb * thumb * number) + len(layers) * len(heads) * 12 + n * 60
        self._check_bytes(estimate, "select fewer layers, heads or query positions, or lower top_k")
        q_index = torch.tensor(queries)
        result = {"layers": layers, "heads": heads, "query_positions": queries, "aggregate": query.aggregate,
                  "precision": query.precision, "attention": [] if query.include_weights else None,
                  "entropy": [], "top_k": [], "thumbnails": [] if thumb else None}
        for index, (weights, _) in enumerate(eager_layers(self.model, toks.ids)):
            if index > layers[-1]:
                break
            if index not in layers:
                continue
            w = weights[heads][:, q_index.to(weights.device)].cpu()  # (h, q, T)
            result["entropy"].append(_rounded(torch.special.entr(w).sum(-1).mean(-1), query.precision))
            if query.aggregate == "mean":
                w = w.mean(0, keepdim=True)
            elif query.aggregate == "max":
                w = w.amax(0, keepdim=True)
            if query.include_weights:
                result["attention"].append(_rounded(w, query.precision))
            if query.top_k:
                top = w.topk(min(query.top_k, n), dim=-1)
                result["top_k"].append(_pairs(top.indices, top.values, queries, query.precision))
            if thumb:
                result["thumbnails"].append(_rounded(_thumbnail(weights[heads].cpu(), query.aggregate, thumb),
                                                     query.precision))
        return result

    @torch.inference_mode()
    def logit_lens(self, toks: Tokens, query: LensQuery) -> dict:
        """Top-k next-token predictions of each selected layer's residual stream through final norm + LM head."""
        layers = select(query.layers, self.facts["layers"], "layers")
        positions = select(query.positions, len(toks.ids), "positions")
        estimate = len(layers) * len(positions) * query.top_k * (query.precision + 40) + len(toks.ids) * 60
        self._check_bytes(estimate, "select fewer layers or positions, or lower top_k")
        pos_index = torch.tensor(positions)
        predictions = []
        for index, (_, hidden) in enumerate(eager_layers(self.model, toks.ids)):
            if index > layers[-1]:
                break
            if index in layers:
                predictions.append(self._lens_layer(hidden[pos_index.to(hidden.device)], query))
        return {"layers": layers, "positions": positions, "precision": query.precision, "predictions": predictions}

    def _lens_layer(self, hidden: torch.Tensor, query: LensQuery) -> list[list[dict]]:
        rows = []
        for chunk in hidden.split(LENS_CHUNK):
            probs = self.model.compute_logits(chunk).softmax(-1)  # compute_logits applies the final norm
            top = probs.topk(query.top_k, dim=-1)
            for ids, values in zip(top.indices.tolist(), _rounded(top.values, query.precision), strict=True):
                rows.append([{"id": t, "text": self.tokenizer.token_text(t), "prob": p}
                             for t, p in zip(ids, values, strict=True)])
        return rows

    def _check_bytes(self, estimate: int, advice: str) -> None:
        if estimate > self.limits.max_bytes:
            raise InspectionTooLarge(f"the response would be about {estimate} bytes, over the limit of "
                                     f"{self.limits.max_bytes} bytes (inspect_max_bytes); {advice}")


def _pairs(indices: torch.Tensor, values: torch.Tensor, queries: list[int], precision: int) -> list:
    """[head][query] -> [[key, weight], ...] best first, without keys the causal mask hides."""
    weights = _rounded(values, precision)
    return [[[[k, w] for k, w in zip(ks, ws, strict=True) if k <= q]
             for q, ks, ws in zip(queries, head_keys, head_weights, strict=True)]
            for head_keys, head_weights in zip(indices.tolist(), weights, strict=True)]


def _thumbnail(weights: torch.Tensor, aggregate: Aggregate, size: int) -> torch.Tensor:
    """(h, T, T) -> (h or 1, size, size), max-pooled so one sharp key still shows."""
    pooled = F.adaptive_max_pool2d(weights, (size, size))
    if aggregate == "mean":
        return pooled.mean(0, keepdim=True)
    if aggregate == "max":
        return pooled.amax(0, keepdim=True)
    return pooled
