"""GGUF SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral, Gemma) as a HF
`tokenizers` BPE that gives llama.cpp's ids.

llama.cpp tokenizes these by repeatedly merging the adjacent pair whose joined text is the vocabulary entry
with the highest score, falling back to <0xNN> byte tokens for characters the vocabulary lacks. A BPE whose
merge ranks follow those scores does the same, so the merges are derived here from the scores. Spaces become
"▁" and, with add_space_prefix (the SentencePiece "dummy prefix"), every run of text gets one in front,
after special tokens too, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

SPACE = "\u2581"  # "▁", SentencePiece's visible space
# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_bpe(tokens: list[str], meta: dict[str, Any]) -> HFTokenizer:
    """The tokenizer for a "llama" GGUF vocabulary: tokens with their scores and types from `meta`."""
    scores: list[float] = meta.get("tokenizer.ggml.scores") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(f"GGUF SentencePiece vocabulary has {len(tokens)} tokens but {len(scores)} scores and "
                         f"{len(types)} token types")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = HFTokenizer(models.BPE(vocab, _merges(tokens, scores, types, vocab), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # A normalizer, not a Metaspace pre-tokenizer: Metaspace adds no prefix to text that starts with a space,
    # where SentencePiece and llama.cpp do ("  x" -> "▁▁x").
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence([
        decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if prefix else []),
    ])
    # Control and unknown tokens are special (skipped when decoding); user-defined ones are matched whole.
    special = [t for t, kind in zip(tokens, types, strict=True) if kind in (CONTROL, UNKNOWN)]
    user = [t for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    backend.post_processor = _bos_eos(tokens, meta)
    return backend


def _merges(tokens: list[str], scores: list[float], types: list[int],
            vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two vocabulary entries, best-scored token first (llama.cpp's order)."""
    candidates = []
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != NORMAL or len(token) < 2 or vocab.get(token) != index:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[index], index, vocab[left], left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def _bos_eos(tokens: list[str], meta: dict[str, Any]) -> processors.TemplateProcessing | None:
    """BOS (llama.cpp's default for these vocabularies) and EOS around the text, as the metadata asks."""
    def special(key: str, add_key: str, default: bool) -> tuple[str, int] | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        wanted = meta.get(f"tokenizer.ggml.{add_key}", default)
        if not wanted or token_id is None or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)], int(token_id)

    bos = special("bos_token_id", "add_bos_token", True)
    eos = special("eos_token_id", "add_eos_token", False)
    if bos is None and eos is None:
        return None
    template = " ".join([*([bos[0]] if bos else []), "$A", *([eos[0]] if eos else [])])
    return processors.TemplateProcessing(single=template, special_tokens=[t for t in (bos, eos) if t])
