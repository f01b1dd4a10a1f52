"""GGUF files (llama.cpp's format): the architecture from metadata, tensors dequantized under HF names.

The `gguf` package parses and dequantizes; this module maps llama.cpp's names and layouts back to
Hugging Face's, so the models load GGUF and safetensors checkpoints through the same `load_weight`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from engine.config import ModelConfig
from engine.gguf_lowbit import dequant_iq4_nl, dequant_iq4_xs, dequant_q2_k, dequant_q3_k
from engine.models.family import Family
from engine.models.llama import permute_rotary, unpermute_rotary  # noqa: F401 - llama.cpp's q/k row order

SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS})
_LLAMA3_FREQS = "rope_freqs.weight"  # per-frequency rope divisors llama.cpp writes for Llama 3.x


class _Reader(GGUFReader):
    """GGUFReader parsing metadata from a plain ndarray view of the map: about 3x faster on big vocabularies.

    np.memmap's per-slice bookkeeping dominates parsing ~100k token strings; the view shares the same map.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        self.data = self.data.view(np.ndarray)
        return super()._build_fields(offs, count)


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Parse a GGUF file's header (tensors stay memory-mapped); ValueError when it is not GGUF."""
    path = os.fspath(path)
    stat = os.stat(path)
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)


# Config, tensor count, tensors and the tokenizer all read one file at start-up; parsing it once
# saves seconds of cold start. Keyed by mtime and size so a rewritten file is parsed again.
@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFReader:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return _Reader(path)
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: corrupt or unsupported GGUF file ({e})") from e


def _reader(source: str | os.PathLike | GGUFReader) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(source)


def _field(reader: GGUFReader, key: str, default: object = None) -> object:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _tensor(reader: GGUFReader, name: str) -> ReaderTensor | None:
    return next((t for t in reader.tensors if t.name == name), None)


class GGUFMetadata:
    """One GGUF file's metadata as a family reads it: keys under its architecture's prefix, small tensors."""

    def __init__(self, reader: GGUFReader, arch: str, source: str) -> None:
        self.reader, self.arch, self.source = reader, arch, source

    def get(self, key: str, default: object = None) -> object:
        """`{arch}.{key}`, or default."""
        return _field(self.reader, f"{self.arch}.{key}", default)

    def require(self, key: str) -> object:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.source}: GGUF metadata lacks {self.arch}.{key}")
        return value

    def has_tensor(self, name: str) -> bool:
        return _tensor(self.reader, name) is not None

    def tensor(self, name: str) -> torch.Tensor | None:
        t = _tensor(self.reader, name)
        return None if t is None else dequantize_tensor(t).float()

    def common(self) -> dict:
        """Fields every family reads alike: vocabulary size and special tokens."""
        embedding = _tensor(self.reader, "token_embd.weight")
        if embedding is None:
            raise ValueError(f"{self.source}: GGUF file has no token_embd.weight tensor")
        eos_ids = [int(_field(self.reader, key)) for key in ("tokenizer.ggml.eos_token_id",
                                                              "tokenizer.ggml.eot_token_id")
                   if _field(self.reader, key) is not None]
        bos = _field(self.reader, "tokenizer.ggml.bos_token_id")
        return dict(vocab_size=int(embedding.shape[-1]),  # GGUF dims are (hidden, vocab): innermost first
                    bos_token_id=None if bos is None else int(bos), eos_token_ids=list(dict.fromkeys(eos_ids)))

    def rope_scaling(self) -> dict | None:
        """HF-style rope_scaling from llama.cpp's keys, or its rope_freqs tensor (Llama 3.x)."""
        freqs = self.tensor(_LLAMA3_FREQS)
        if freqs is not None:
            # llama.cpp stores Llama-3 scaling as the divisor of each inverse frequency, computed from
            # HF's llama3 parameters; kvserve applies the divisors as they are.
            return {"rope_type": "freq_factors", "factors": freqs.tolist()}
        kind = self.get("rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self.get("rope.scaling.factor", 1.0))}
        raise ValueError(f"{self.source}: unsupported GGUF rope scaling {kind!r} "
                         "(supported: none, linear, llama3 rope_freqs)")


def _family(reader: GGUFReader, source: str) -> tuple[Family, GGUFMetadata]:
    from engine.models import family_for_gguf

    arch = _field(reader, "general.architecture")
    return family_for_gguf(arch, source), GGUFMetadata(reader, arch, source)


def read_gguf_config(source: str | os.PathLike | GGUFReader) -> ModelConfig:
    """The model architecture from a GGUF file's metadata, mapped by its family."""
    reader = _reader(source)
    fam, meta = _family(reader, _source_name(source))
    return fam.from_gguf(meta)


def _source_name(source: str | os.PathLike | GGUFReader) -> str:
    return "GGUF file" if isinstance(source, GGUFReader) else os.fspath(source)


def gguf_tensor_count(source: str | os.PathLike | GGUFReader) -> int:
    """How many tensors gguf_tensors will yield (for the progress bar)."""
    reader = _reader(source)
    fam, _ = _family(reader, _source_name(source))
    return sum(1 for t in reader.tensors if t.name not in fam.gguf_config_tensors)


def gguf_tensors(source: str | os.PathLike | GGUFReader, cfg: ModelConfig,
                 bar: tqdm | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in HF layout), dequantized one at a time to float32 (F16/BF16 kept as is)."""
    reader = _reader(source)
    unsupported = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES})
    if unsupported:
        raise ValueError(f"unsupported GGUF tensor type(s) {', '.join(unsupported)}; kvserve supports "
                         f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
    fam, meta = _family(reader, _source_name(source))
    for t in reader.tensors:
        if t.name in fam.gguf_config_tensors:
            continue  # read into the config already
        name = fam.hf_name(t.name)
        tensor = fam.gguf_layout(name, dequantize_tensor(t), cfg, meta.arch)
        if bar is not None:
            bar.update(1)
        yield name, tensor


def dequantize_tensor(t: ReaderTensor) -> torch.Tensor:
    """One GGUF tensor as torch: float32, or float16/bfloat16 as stored (the caller casts)."""
    if t.tensor_type == Q.F16:
        return torch.from_numpy(np.array(t.data))  # copied out of the read-only map; cast later
    if t.tensor_type == Q.BF16:
        raw = np.array(t.data).view(np.int16)  # bytes -> one int16 per value, last dim halves
        return torch.from_numpy(raw).view(torch.bfloat16)
    if t.tensor_type == Q.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32))
    if t.tensor_type in _FAST_DEQUANT:
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8))  # writable: torch warns on read-only maps
        return _FAST_DEQUANT[t.tensor_type](raw)
    return torch.from_numpy(dequantize(t.data, t.tensor_type))


# The common 32-value block formats, vectorised in torch: ~10x faster than gguf's numpy path on 2 cores,
# which is most of a cold start. Each row of `raw` holds whole blocks; the result keeps the row shape.
def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: low nibbles are values 0-15, high nibbles 16-31."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 34)
    values = b[..., 2:].contiguous().view(torch.int8).float() * _f16(b, 0)
    return values.flatten(-2)


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 18)
    return ((_nibbles(b[..., 2:]) - 8.0) * _f16(b, 0)).flatten(-2)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    b = _blocks(raw, 20)
    return (_nibbles(b[..., 4:]) * _f16(b, 0) + _f16(b, 2)).flatten(-2)


_FAST_DEQUANT = {Q.Q8_0: _dequant_q8_0, Q.Q4_0: _dequant_q4_0, Q.Q4_1: _dequant_q4_1,
                 Q.Q2_K: dequant_q2_k, Q.Q3_K: dequant_q3_k, Q.IQ4_NL: dequant_iq4_nl, Q.IQ4_XS: dequant_iq4_xs}
