"""Sliding windows in the paged cache: when every layer slides (Mistral), blocks out of the window go back
while a sequence runs, so long generations hold a bounded number of blocks, and outputs stay transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_engine import _tokenizer
from helpers.tiny_families import WINDOW, tiny_gemma2, tiny_mistral
from helpers.tiny_models import save_hf

from engine.llm import LLM
from engine.sampling_params import SamplingParams

BLOCK = 4
PROMPT = torch.randint(3, 320, (14,), generator=torch.Generator().manual_seed(11)).tolist()
NEW_TOKENS = 90


def _serve(hf: torch.nn.Module, path: Path) -> LLM:
    save_hf(hf, path)
    _tokenizer().save(str(path / "tokenizer.json"))
    return LLM(str(path), device="cpu", dtype="float32", quantization="none", max_model_len=128, block_size=BLOCK)


def _run(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[list[int]], int]:
    """(each sample's tokens, most blocks in use at once)."""
    engine = llm.engine
    engine.add_request("r", prompt, params)
    peak, done = 0, None
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                done = output
        peak = max(peak, engine.blocks.num_blocks - engine.blocks.num_free_blocks)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # nothing leaked
    return [o.token_ids for o in done.outputs], peak


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory):
    hf = tiny_mistral()
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    return _serve(hf, tmp_path_factory.mktemp("mistral")), out[0, len(PROMPT):].tolist()


def test_long_generation_holds_a_bounded_cache(mistral) -> None:
    llm, expected = mistral
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (tokens,), peak = _run(llm, PROMPT, greedy)
    assert tokens == expected
    # the window's blocks, the one being written and one partly out of the window; not the 26 of the whole
    assert peak <= WINDOW // BLOCK + 2
    # again: the prompt's blocks come from the prefix cache although the first run gave them back mid-way
    hits = llm.engine.blocks.prefix_hits
    (again,), _ = _run(llm, PROMPT, greedy)
    assert again == expected and llm.engine.blocks.prefix_hits > hits


def test_forked_samples_share_given_back_blocks(mistral) -> None:
    llm, expected = mistral
    samples, peak = _run(llm, PROMPT, SamplingParams(n=2, temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert samples == [expected, expected]
    assert peak <= 2 * (WINDOW // BLOCK + 2)


def test_beside_other_sequences(mistral) -> None:
    """Batch invariance holds with window masks and given-back blocks: logprobs bitwise as alone."""
    llm, expected = mistral
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    alone = llm.generate(PROMPT, greedy)[0].outputs[0]
    outputs = llm.generate([PROMPT[:5], PROMPT, PROMPT[2:] + PROMPT], greedy)
    beside = outputs[1].outputs[0]
    assert beside.token_ids == alone.token_ids == expected
    assert [lp.logprob for lp in beside.logprobs] == [lp.logprob for lp in alone.logprobs]


def test_soft_capped_attention_beside_other_sequences(tmp_path: Path) -> None:
    """Gemma 2's soft-capped scores are a matmul of their own (SDPA has no soft-capping); batched over
    several decodes it rounded a sequence's scores differently: logprobs must be bitwise as alone."""
    llm = _serve(tiny_gemma2(), tmp_path)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    alone = llm.generate(PROMPT, greedy)[0].outputs[0]
    # Neighbours of the same length decode in the same attention call (one block-table length).
    beside = llm.generate([PROMPT[1:] + PROMPT[:1], PROMPT, PROMPT[::-1]], greedy)[1].outputs[0]
    assert beside.token_ids == alone.token_ids
    assert [lp.logprob for lp in beside.logprobs] == [lp.logprob for lp in alone.logprobs]


def test_global_layers_keep_every_block(tmp_path: Path) -> None:
    """Gemma 2's global layers read the whole context: nothing is given back."""
    llm = _serve(tiny_gemma2(), tmp_path)
    assert llm.engine.blocks.sliding_window is None
    _, peak = _run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert peak == -(-(len(PROMPT) + 30) // BLOCK)
