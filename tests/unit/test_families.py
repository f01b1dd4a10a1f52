"""Qwen3, Mistral (sliding window), Gemma 2, Gemma 3 and Phi-3 against transformers on tiny random models.

Prompts run well past the 8-token sliding window, in one piece and in chunks across cache blocks; the
inspection path (the model's own layers with eager attention) is checked against output_attentions,
greedy continuations of the served engine against transformers' generate, and GGUF files written as
llama.cpp writes each arch load to the same logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.tiny_engine import _tokenizer
from helpers.tiny_families import (
    WINDOW,
    tiny_gemma2,
    tiny_gemma3,
    tiny_gemma3_multimodal,
    tiny_mistral,
    tiny_phi3,
    tiny_qwen3,
    write_family_gguf,
)
from helpers.tiny_models import hf_logits, save_hf

from engine.inspect import eager_layers
from engine.llm import LLM
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.weights import load_model

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "qwen3": tiny_qwen3,
    "mistral-window": tiny_mistral,
    "gemma2": tiny_gemma2,
    "gemma3": tiny_gemma3,
    "phi3-longrope": tiny_phi3,
}
PROMPT = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(3)).tolist()
assert len(PROMPT) > 4 * WINDOW


def kvserve_logits(path: str, ids: list[int], chunk_size: int | None = None, max_positions: int = 64) -> torch.Tensor:
    model, cfg = load_model(path, "cpu", torch.float32, max_positions=max_positions, progress=False)
    runner = ModelRunner.for_testing(model, cfg, block_size=4, num_blocks=32)
    return runner.logits_for(ids, chunk_size=chunk_size)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family, transformers model with eager attention, its HF dir with a tokenizer)."""
    hf = MODELS[request.param]()
    hf.set_attn_implementation("eager")
    path = tmp_path_factory.mktemp(request.param)
    save_hf(hf, path)
    _tokenizer().save(str(path / "tokenizer.json"))
    return request.param, hf, str(path)


@pytest.mark.parametrize("chunk_size", [None, 1, 3], ids=["full", "token-by-token", "chunks-of-3"])
def test_logits_match_transformers(saved, chunk_size: int | None) -> None:
    _, hf, path = saved
    torch.testing.assert_close(kvserve_logits(path, PROMPT, chunk_size), hf_logits(hf, PROMPT),
                               rtol=1e-4, atol=1e-4)


def test_inspection_weights_match_eager_transformers(saved) -> None:
    _, hf, path = saved
    model, _ = load_model(path, "cpu", torch.float32, max_positions=64, progress=False)
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT]), output_attentions=True, output_hidden_states=True)
        got = list(eager_layers(model, PROMPT))
    assert len(got) == len(expected.attentions) == hf.config.num_hidden_layers
    for (weights, _), theirs in zip(got, expected.attentions, strict=True):
        torch.testing.assert_close(weights, theirs[0], rtol=0, atol=1e-4)
    # the logit lens reads the same residual stream transformers hands out (the last one is after its norm)
    for (_, hidden), theirs in zip(got[:-1], expected.hidden_states[1:-1], strict=True):
        torch.testing.assert_close(hidden, theirs[0], rtol=1e-4, atol=1e-4)


def test_greedy_continuation_matches_transformers(saved) -> None:
    """The served engine (exact fp32 weights) continues as transformers does, past the window."""
    family, hf, path = saved
    prompt = PROMPT[:36]  # past Phi-3's original 32 positions, so transformers uses the long factors throughout
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    llm = LLM(path, device="cpu", dtype="float32", quantization="none", max_model_len=128, block_size=4)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    assert alone == expected
    # beside a shorter and a longer sequence (other decode groups, other windows), and from the prefix cache
    batch = llm.generate([PROMPT[:9], prompt, PROMPT], greedy)
    assert batch[1].outputs[0].token_ids == expected
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3-longrope"])
def test_gguf_round_trip(tmp_path: Path, family: str) -> None:
    # llama.cpp keeps no query_pre_attn_scalar (it scales by head_dim), so Gemma's is head_dim here
    hf = {"gemma2": lambda: tiny_gemma2(query_pre_attn_scalar=16),
          "gemma3": lambda: tiny_gemma3(query_pre_attn_scalar=16)}.get(family, MODELS[family])()
    from_dir = kvserve_logits(save_hf(hf, tmp_path / "hf"), PROMPT)
    from_gguf = kvserve_logits(write_family_gguf(hf, tmp_path / "model.gguf"), PROMPT, chunk_size=5)
    torch.testing.assert_close(from_gguf, from_dir, rtol=1e-4, atol=1e-4)  # Gemma's 1 + w - 1 rounds
    torch.testing.assert_close(from_gguf, hf_logits(hf, PROMPT), rtol=1e-4, atol=1e-4)


def test_phi3_short_factors_within_the_original_context(tmp_path: Path) -> None:
    """Served no longer than the original context, LongRoPE uses its short factors, as transformers does there."""
    hf = tiny_phi3()
    path = save_hf(hf, tmp_path)
    short = PROMPT[:24]
    torch.testing.assert_close(kvserve_logits(path, short, max_positions=32), hf_logits(hf, short),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(kvserve_logits(path, short, max_positions=64), hf_logits(hf, short), atol=1e-3)


def test_phi4_mini_rotary_share(tmp_path: Path) -> None:
    hf = tiny_phi3(partial_rotary_factor=0.75)
    torch.testing.assert_close(kvserve_logits(save_hf(hf, tmp_path), PROMPT), hf_logits(hf, PROMPT),
                               rtol=1e-4, atol=1e-4)


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path: Path) -> None:
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: the text part loads, the vision tower is skipped."""
    hf = tiny_gemma3_multimodal()
    path = save_hf(hf, tmp_path)
    torch.testing.assert_close(kvserve_logits(path, PROMPT, chunk_size=7), hf_logits(hf, PROMPT),
                               rtol=1e-4, atol=1e-4)
