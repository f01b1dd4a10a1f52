"""GGUF loading: tiny models written as llama.cpp would load to the same logits as their safetensors dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from helpers.cpu_formats import runs_here
from helpers.tiny_models import (
    hf_logits,
    roundtrip,
    save_hf,
    tiny_gpt2,
    tiny_llama,
    tiny_qwen2,
    write_gguf,
)

from engine.gguf_loader import (
    SUPPORTED_TYPES,
    dequantize_tensor,
    open_gguf,
    permute_rotary,
    read_gguf_config,
    unpermute_rotary,
)
from engine.models.cpu_matmul import pack_linears
from engine.models.q8_matmul import q8_kernel_runs
from engine.runner import ModelRunner
from engine.weights import load_model

PROMPT = torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(2)).tolist()
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama-gqa": tiny_llama,  # q/k rows permuted by the writer, untied head
    "llama-tied": lambda: tiny_llama(tie=True),
    "qwen2-bias": tiny_qwen2,  # not permuted, q/k/v biases
    "gpt2": tiny_gpt2,  # fused qkv, Conv1D layout, learned positions
}


def kvserve_logits(path: str, ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
    model, cfg = load_model(path, "cpu", torch.float32, max_positions=64, progress=False)
    return ModelRunner.for_testing(model, cfg, block_size=4, num_blocks=16).logits_for(ids, chunk_size)


@runs_here("int4")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_auto_keeps_4bit_gguf_weights_4bit(tmp_path: Path, qtype: Q) -> None:
    """`auto` finds a 4-bit GGUF's grids in the dequantized weights and packs them as int4, leaving 8-bit
    ones to the float format (but an 8-bit LM head to the 8-bit kernel). Kept 4-bit, the logits move by bf16 rounding only (on these sharp random
    weights 2-4% of the largest logit); rounding 8-bit weights to 4 bits moves them ~50%."""
    gguf_path = write_gguf(MODELS["llama-gqa"](), tmp_path / "model.gguf", qtype)
    exact = kvserve_logits(gguf_path, PROMPT)

    def error_with(quantization: str, keep_4bit: bool) -> tuple[str, float]:
        model, cfg = load_model(gguf_path, "cpu", torch.float32, max_positions=64, progress=False)
        used = pack_linears(model, quantization, keep_4bit)
        logits = ModelRunner.for_testing(model, cfg, block_size=4, num_blocks=16).logits_for(PROMPT)
        return used, ((logits - exact).abs().amax(-1) / exact.abs().amax(-1)).max().item()

    used, error = error_with("fp16", keep_4bit=True)  # what auto does on a CPU without AMX
    if qtype == Q.Q8_0:
        # The LM head keeps its 8-bit codes on kvserve's kernel where it runs, with activations quantized to 8 bits
        # per group of 32 as llama.cpp does: ~1% of the largest logit here, where the fp16 head moves < 0.5%.
        if q8_kernel_runs():
            assert used == "fp16+q8_0" and error < 0.02
        else:
            assert used == "fp16" and error < 5e-3
        assert error_with("int4", keep_4bit=False)[1] > 0.2  # asked for: rounded to 4 bits, and lossy
    else:
        assert used == "int4" and error < 0.08  # the tiny model's LM head is 4-bit too


@pytest.mark.parametrize("family", list(MODELS))
def test_f32_gguf_loads_exactly_like_safetensors(tmp_path: Path, family: str) -> None:
    hf = MODELS[family]()
    from_dir = kvserve_logits(save_hf(hf, tmp_path / "hf"), PROMPT)
    gguf_path = write_gguf(hf, tmp_path / "model.gguf")
    torch.testing.assert_close(kvserve_logits(gguf_path, PROMPT), from_dir, rtol=0, atol=0)
    torch.testing.assert_close(kvserve_logits(gguf_path, PROMPT, chunk_size=1), hf_logits(hf, PROMPT),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_quantized_gguf_matches_dequantized_reference(tmp_path: Path, family: str, qtype: Q) -> None:
    # The reference is transformers run on the same weights after gguf's quantize -> dequantize round
    # trip, so any remaining difference is kvserve's, not quantization noise: the fp32 bar of 1e-4 holds.
    hf = MODELS[family]()
    gguf_path = write_gguf(hf, tmp_path / "model.gguf", qtype)
    original = hf_logits(hf, PROMPT)
    reference = hf_logits(roundtrip(hf, qtype), PROMPT)
    logits = kvserve_logits(gguf_path, PROMPT)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # Against the unquantized model only loosely: 4-bit noise on random weights is large, so compare
    # the direction of the logits (a wrong layout would scramble them, cosine near 0).
    similarity = torch.nn.functional.cosine_similarity(logits.flatten(), original.flatten(), dim=0).item()
    assert similarity > (0.999 if qtype == Q.Q8_0 else 0.9)
    assert not torch.equal(logits, original)


def test_llama3_rope_freqs_tensor(tmp_path: Path) -> None:
    # llama.cpp keeps no llama3 rope keys; it writes per-frequency divisors as rope_freqs.weight.
    hf = tiny_llama(llama3_rope=True)
    path = write_gguf(hf, tmp_path / "llama3.gguf")
    assert read_gguf_config(path).rope_scaling["rope_type"] == "freq_factors"
    torch.testing.assert_close(kvserve_logits(path, PROMPT), hf_logits(hf, PROMPT), rtol=1e-4, atol=1e-4)


def test_config_from_metadata(tmp_path: Path) -> None:
    llama = read_gguf_config(write_gguf(tiny_llama(), tmp_path / "llama.gguf"))
    assert (llama.arch, llama.num_layers, llama.hidden_size, llama.intermediate_size) == ("llama", 2, 64, 128)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.vocab_size) == (4, 2, 16, 96)
    assert (llama.tie_word_embeddings, llama.attention_bias) == (False, False)
    assert (llama.bos_token_id, llama.eos_token_ids, llama.norm_eps) == (1, [2], pytest.approx(1e-5))
    assert llama.max_position_embeddings == 128 and llama.rope_scaling is None
    qwen = read_gguf_config(write_gguf(tiny_qwen2(), tmp_path / "qwen.gguf"))
    assert (qwen.tie_word_embeddings, qwen.attention_bias) == (True, True)
    gpt2 = read_gguf_config(write_gguf(tiny_gpt2(), tmp_path / "gpt2.gguf"))
    assert (gpt2.arch, gpt2.max_position_embeddings, gpt2.intermediate_size) == ("gpt2", 64, 256)


def test_rotary_permutation_round_trip() -> None:
    weight = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    permuted = permute_rotary(weight, 4)
    # Head 0's rows become (0, 4, 1, 5, 2, 6, 3, 7): first and second rotary halves interleaved.
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(unpermute_rotary(permuted, 4), weight)


def _write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q | None]], arch: str = "llama") -> str:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


# Where each block keeps its fp16 scales (byte offset, how many): ggml's block structs.
_SCALE_SLOTS = {Q.Q2_K: (80, 2), Q.Q3_K: (108, 1), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1),
                Q.IQ4_NL: (0, 1), Q.IQ4_XS: (0, 1)}


def _random_blocks(qtype: Q, rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw blocks for types gguf cannot quantize: random bytes with finite, sane fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    start, count = _SCALE_SLOTS.get(qtype, (0, 1))
    scales = rng.uniform(0.01, 0.1, (rows, cols // block, count)).astype(np.float16).view(np.uint8)
    raw[..., start:start + 2 * count] = scales
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda q: q.value), ids=lambda q: q.name)
def test_every_supported_type_dequantizes(tmp_path: Path, qtype: Q) -> None:
    rows, cols = 3, 512
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    if qtype in (Q.F32, Q.F16):
        data, expected = values.astype(np.float16 if qtype == Q.F16 else np.float32), None
        raw_dtype = None
    elif qtype in _SCALE_SLOTS:
        data, raw_dtype = _random_blocks(qtype, rows, cols, qtype.value), qtype
    else:
        data, raw_dtype = gguf.quants.quantize(values, qtype), qtype
    path = _write_tensors(tmp_path / "t.gguf", {"t": (data, raw_dtype)})
    (tensor,) = open_gguf(path).tensors
    got = dequantize_tensor(tensor).float()
    assert got.shape == (rows, cols)
    if qtype == Q.BF16:
        expected = torch.from_numpy(values).to(torch.bfloat16).float()  # independent of gguf's dequantizer
    elif qtype in (Q.F32, Q.F16):
        expected = torch.from_numpy(data.astype(np.float32))
    else:
        expected = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.isfinite(got).all()


# --- clear errors --------------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(path), "cpu", torch.float32, 64, progress=False)


def test_truncated_gguf(tmp_path: Path) -> None:
    whole = Path(write_gguf(tiny_llama(), tmp_path / "whole.gguf")).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_model(str(cut), "cpu", torch.float32, 64, progress=False)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_tensors(tmp_path / "mamba.gguf", {"token_embd.weight": (np.zeros((4, 32), np.float32), None)},
                          arch="mamba")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'mamba'"):
        load_model(path, "cpu", torch.float32, 64, progress=False)


def _copy_gguf(src: str, dst: Path, replace: dict[str, tuple[np.ndarray, Q]],
               extra: dict[str, np.ndarray] | None = None) -> str:
    """Rewrite a tiny GGUF with some tensors replaced (raw data, type) and some added."""
    reader = open_gguf(src)
    writer = gguf.GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        data, raw_dtype = replace.get(t.name, (np.array(t.data), None))
        writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    for name, data in (extra or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(dst)


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    src = write_gguf(tiny_llama(), tmp_path / "ok.gguf")
    down = _random_blocks(Q.IQ2_XXS, 64, 256, 0)
    bad = _copy_gguf(src, tmp_path / "bad.gguf", {"blk.0.ffn_down.weight": (down, Q.IQ2_XXS)})
    with pytest.raises(ValueError, match="unsupported GGUF tensor type.*IQ2_XXS.*supports.*IQ4_XS.*Q2_K") as err:
        load_model(bad, "cpu", torch.float32, 64, progress=False)
    assert all(q.name in str(err.value) for q in SUPPORTED_TYPES)


def test_unexpected_gguf_tensor_is_named(tmp_path: Path) -> None:
    src = write_gguf(tiny_llama(), tmp_path / "ok.gguf")
    bad = _copy_gguf(src, tmp_path / "bad.gguf", {}, {"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="blk.0.attn_sinks.weight"):
        load_model(bad, "cpu", torch.float32, 64, progress=False)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_fast_dequantizers_equal_gguf_reference(qtype) -> None:
    """The torch block decoders used on the load path give gguf's numpy results exactly."""
    from gguf.quants import dequantize, quantize

    from engine.gguf_loader import _FAST_DEQUANT

    values = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    packed = quantize(values, qtype)
    got = _FAST_DEQUANT[qtype](torch.from_numpy(packed.view(np.uint8))).numpy()
    np.testing.assert_array_equal(got, dequantize(packed, qtype))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_bit_decoders_equal_gguf_reference(qtype: Q, seed: int) -> None:
    """Random blocks (every bit pattern of the packed values and scales) decode bitwise as gguf's numpy."""
    from gguf.quants import dequantize

    from engine.gguf_loader import _FAST_DEQUANT

    packed = _random_blocks(qtype, 7, 1024, seed)
    expected = dequantize(packed, qtype)
    got = _FAST_DEQUANT[qtype](torch.from_numpy(packed)).numpy()
    assert got.shape == expected.shape == (7, 1024)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 100  # the random blocks exercise many distinct values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_k_tensors_are_found_on_a_4bit_grid(seed: int) -> None:
    """Q4_K (the 4-bit tensors of the common Q4_K_M files) is a 4-bit grid per sub-block of 32, with a
    6-bit scale and min each: `auto` finds it like Q4_0/Q4_1's, and the grid gives back gguf's values."""
    from gguf.quants import dequantize

    from engine.models.int4_matmul import GROUP, four_bit_groups

    values = torch.from_numpy(dequantize(_random_blocks(Q.Q4_K, 32, 512, seed), Q.Q4_K))
    groups = four_bit_groups(values)
    assert groups is not None
    assert 0 <= groups.q.min() and groups.q.max() <= 15
    q = groups.q.reshape(32, -1, GROUP).float()
    rebuilt = (groups.low[..., None] + q * groups.step[..., None]).reshape(values.shape)
    torch.testing.assert_close(rebuilt, values, rtol=1e-5, atol=1e-5)
