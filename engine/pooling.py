"""Embeddings: how a model's final hidden states become one vector per input.

An embedding request is a prefill-only sequence in the ordinary batch. The runner hands each computed
chunk's final hidden states (after the final norm, before the LM head) to the sequence's Pooler; when the
last prompt token is computed the engine finishes the sequence (its KV blocks go back) and returns the
pooled vector, L2-normalized as OpenAI's embeddings are.

Which pooling a model uses comes from its sentence-transformers files (modules.json naming a Pooling
module with its config.json), or a GGUF's `{arch}.pooling_type`, else a default per architecture:
decoder-only models (Qwen3-Embedding, e5-mistral, gte-Qwen2) embed with their last token.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

import torch


class PoolingMethod(enum.Enum):
    LAST = "last"  # the last token's state: decoder models, whose last token has seen the whole input
    MEAN = "mean"  # the average over every token
    CLS = "cls"  # the first token's state (BERT-style [CLS])


# sentence-transformers' Pooling config flags, and llama.cpp's pooling_type numbers, for each method.
_ST_FLAGS = {"pooling_mode_lasttoken": PoolingMethod.LAST, "pooling_mode_mean_tokens": PoolingMethod.MEAN,
             "pooling_mode_cls_token": PoolingMethod.CLS}
_GGUF_POOLING = {1: PoolingMethod.MEAN, 2: PoolingMethod.CLS, 3: PoolingMethod.LAST}
DEFAULT_POOLING = {"llama": PoolingMethod.LAST, "gpt2": PoolingMethod.LAST}


@dataclass(frozen=True, slots=True)
class EmbeddingParams:
    """What an embedding request asks for: `dimensions` keeps the first N values (Matryoshka), re-normalized."""

    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")

    @property
    def n(self) -> int:
        """One output per request (the request path treats this like SamplingParams.n)."""
        return 1

    @property
    def structured_output(self) -> None:
        """No constrained decoding: nothing is sampled (read where SamplingParams.structured_output is)."""
        return None


def read_pooling_method(model_path: str | Path, arch: str) -> PoolingMethod:
    """The pooling a model was trained with: sentence-transformers config, GGUF metadata, else per arch."""
    path = Path(model_path)
    found = _from_sentence_transformers(path) if path.is_dir() else _from_gguf(path)
    return found or DEFAULT_POOLING.get(arch, PoolingMethod.LAST)


def _from_sentence_transformers(root: Path) -> PoolingMethod | None:
    """modules.json names the Pooling module's folder (usually 1_Pooling); its config.json sets the mode."""
    folders = []
    modules = root / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text(encoding="utf-8"))
        folders = [e.get("path", "") for e in entries if str(e.get("type", "")).endswith(".Pooling")]
    for folder in folders or ["1_Pooling"]:
        config = root / folder / "config.json"
        if not config.is_file():
            continue
        flags = json.loads(config.read_text(encoding="utf-8"))
        chosen = [method for flag, method in _ST_FLAGS.items() if flags.get(flag)]
        if len(chosen) == 1:
            return chosen[0]
        enabled = sorted(k for k, v in flags.items() if k.startswith("pooling_mode") and v)
        raise ValueError(f"{config}: unsupported pooling {enabled or 'none'}; kvserve pools with exactly one of "
                         f"{', '.join(_ST_FLAGS)}")
    return None


def _from_gguf(path: Path) -> PoolingMethod | None:
    from engine.gguf_loader import open_gguf

    reader = open_gguf(path)
    arch_field = reader.get_field("general.architecture")
    field = reader.get_field(f"{arch_field.contents()}.pooling_type") if arch_field is not None else None
    return _GGUF_POOLING.get(int(field.contents())) if field is not None else None


class Pooler:
    """Accumulates one sequence's final hidden states chunk by chunk; a chunk at position 0 starts over
    (a preempted sequence is recomputed from the start)."""

    def __init__(self, method: PoolingMethod, num_tokens: int) -> None:
        self.method, self.num_tokens = method, num_tokens
        self._state: torch.Tensor | None = None

    @property
    def needs_every_position(self) -> bool:
        """Mean and CLS pooling read positions a prefix-cache hit would skip; last-token pooling does not."""
        return self.method is not PoolingMethod.LAST

    def add(self, hidden: torch.Tensor, first_position: int) -> None:
        """hidden (n, H): final states of positions first_position .. first_position + n - 1."""
        if first_position == 0:
            self._state = None
        if self.method is PoolingMethod.MEAN:
            chunk_sum = hidden.float().sum(dim=0)
            self._state = chunk_sum if self._state is None else self._state + chunk_sum
        elif self.method is PoolingMethod.CLS and first_position == 0:
            self._state = hidden[0].float()
        elif self.method is PoolingMethod.LAST and first_position + hidden.shape[0] == self.num_tokens:
            self._state = hidden[-1].float()

    def result(self, dimensions: int | None = None) -> list[float]:
        """The pooled vector, cut to `dimensions` if given, L2-normalized."""
        if self._state is None:
            raise RuntimeError("pooler read before its sequence was computed")
        pooled = self._state / self.num_tokens if self.method is PoolingMethod.MEAN else self._state
        if dimensions is not None:
            pooled = pooled[:dimensions]
        return torch.nn.functional.normalize(pooled, dim=0).tolist()
