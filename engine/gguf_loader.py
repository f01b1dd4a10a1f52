"""GGUF files (llama.cpp's format): the architecture from metadata, tensors dequantized under HF names.

The `gguf` package parses and dequantizes; this module maps llama.cpp's names and layouts back to
Hugging Face's, so the models load GGUF and safetensors checkpoints through the same `load_weight`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from engine.config import ModelConfig
from engine.gguf_lowbit import dequant_iq4_nl, dequant_iq4_xs, dequant_q2_k, dequant_q3_k

SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS})
LLAMA_ARCHS = ("llama", "mistral", "qwen2")
# llama.cpp's converter interleaves the rotary halves of q/k rows for these (its rope kernel is GPT-J
# style); Qwen2 keeps HF's layout because llama.cpp runs it with NeoX-style rope.
_PERMUTED_ARCHS = ("llama", "mistral")
_LLAMA3_FREQS = "rope_freqs.weight"  # per-frequency rope divisors llama.cpp writes for Llama 3.x

_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
    "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


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


def read_gguf_config(source: str | os.PathLike | GGUFReader) -> ModelConfig:
    """The model architecture from a GGUF file's metadata."""
    reader = _reader(source)
    arch = _field(reader, "general.architecture")
    if arch not in (*LLAMA_ARCHS, "gpt2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: kvserve loads {', '.join(LLAMA_ARCHS)} and gpt2")

    def meta(key: str, default: object = None) -> object:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    embedding = _tensor(reader, "token_embd.weight")
    if embedding is None:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    hidden, num_heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    eos_ids = [int(_field(reader, key)) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if _field(reader, key) is not None]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    common = dict(
        vocab_size=int(embedding.shape[-1]),  # GGUF dims are (hidden, vocab): innermost first
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        max_position_embeddings=int(meta("context_length")),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
    )
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", num_kv_heads=num_heads, tie_word_embeddings=True,
                           norm_eps=float(meta("attention.layer_norm_epsilon", 1e-5)), **common)
    return ModelConfig(
        arch="llama",
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("attention.key_length", hidden // num_heads)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings=_tensor(reader, "output.weight") is None,
        attention_bias=_tensor(reader, "blk.0.attn_q.bias") is not None,
        **common,
    )


def _rope_scaling(reader: GGUFReader, arch: str) -> dict | None:
    """HF-style rope_scaling from llama.cpp's keys, or its rope_freqs tensor (Llama 3.x)."""
    freqs = _tensor(reader, _LLAMA3_FREQS)
    if freqs is not None:
        # llama.cpp stores Llama-3 scaling as the divisor of each inverse frequency, computed from
        # HF's llama3 parameters; kvserve applies the divisors as they are.
        return {"rope_type": "freq_factors", "factors": dequantize_tensor(freqs).tolist()}
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"unsupported GGUF rope scaling {kind!r} (supported: none, linear, llama3 rope_freqs)")


def gguf_tensor_count(source: str | os.PathLike | GGUFReader) -> int:
    """How many tensors gguf_tensors will yield (for the progress bar)."""
    return sum(1 for t in _reader(source).tensors if t.name != _LLAMA3_FREQS)


def gguf_tensors(source: str | os.PathLike | GGUFReader, cfg: ModelConfig,
                 bar: tqdm | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in HF layout), dequantized one at a time to float32 (F16/BF16 kept as is)."""
    reader = _reader(source)
    unsupported = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES})
    if unsupported:
        raise ValueError(f"unsupported GGUF tensor type(s) {', '.join(unsupported)}; kvserve supports "
                         f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        if t.name == _LLAMA3_FREQS:
            continue  # read into cfg.rope_scaling already
        tensor = dequantize_tensor(t)
        if cfg.arch == "gpt2":
            name = _gpt2_name(t.name)
            if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
                tensor = tensor.t()  # llama.cpp stores Conv1D weights as (out, in); HF keeps (in, out)
        else:
            name = _llama_name(t.name)
            if arch in _PERMUTED_ARCHS and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = unpermute_rotary(tensor, cfg.num_heads)
            elif arch in _PERMUTED_ARCHS and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = unpermute_rotary(tensor, cfg.num_kv_heads)
        if bar is not None:
            bar.update(1)
        yield name, tensor


def unpermute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved (x0, y0, x1, y1, ...) -> halves (x..., y...)."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(num_heads, rows // num_heads // 2, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape)


def permute_rotary(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter order for q/k rows (the inverse of unpermute_rotary); used to write GGUF."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(num_heads, 2, rows // num_heads // 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape)


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


def _llama_name(name: str) -> str:
    if name in _LLAMA_NAMES:
        return _LLAMA_NAMES[name]
    return _block_name(name, _LLAMA_BLOCK, "model.layers")


def _gpt2_name(name: str) -> str:
    if name in _GPT2_NAMES:
        return _GPT2_NAMES[name]
    return _block_name(name, _GPT2_BLOCK, "h")


def _block_name(name: str, table: dict[str, str], prefix: str) -> str:
    match = _BLOCK_NAME.fullmatch(name)
    if match is None or match.group(2) not in table:
        raise ValueError(f"unexpected tensor {name!r} in GGUF file")
    layer, part, kind = match.groups()
    return f"{prefix}.{layer}.{table[part]}.{kind}"
