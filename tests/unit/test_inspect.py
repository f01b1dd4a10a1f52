"""Attention capture and logit lens against transformers' eager attention (output_attentions=True)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.inspect import (
    AttentionQuery,
    InspectionTooLarge,
    InspectionTooLong,
    InspectLimits,
    Inspector,
    LensQuery,
    eager_layers,
    greedy_generate,
    select,
)
from engine.tokenizer import Tokenizer
from engine.weights import load_model
from tests.helpers.tiny_models import save_hf, tiny_gpt2, tiny_llama

MODELS: dict[str, Callable[[], torch.nn.Module]] = {"llama-gqa": tiny_llama, "gpt2": tiny_gpt2}
PROMPT = torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(7)).tolist()


class PieceTokenizer:
    """Token text '<id>' for every id: enough for token-id prompts."""

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(transformers model with eager attention, the same weights loaded by kvserve)."""
    hf = MODELS[request.param]()
    hf.set_attn_implementation("eager")
    model, _ = load_model(save_hf(hf, tmp_path_factory.mktemp(request.param)), "cpu", torch.float32,
                          max_positions=64, progress=False)
    return hf, model


def hf_outputs(hf: torch.nn.Module, ids: list[int]):
    with torch.no_grad():
        return hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)


def as_tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def inspector(model: torch.nn.Module, **limits: int) -> Inspector:
    return Inspector(model, PieceTokenizer(), max_model_len=64, stop_ids=set(), limits=InspectLimits(**limits))


def test_weights_match_transformers(pair) -> None:
    hf, model = pair
    expected = hf_outputs(hf, PROMPT).attentions
    with torch.no_grad():
        got = [weights for weights, _ in eager_layers(model, PROMPT)]
    assert len(got) == len(expected) == 2
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs[0], rtol=0, atol=1e-4)
        assert torch.all(mine.triu(1) == 0)  # causal: no weight on later keys


def test_attention_report_selects_and_aggregates(pair) -> None:
    hf, model = pair
    expected = hf_outputs(hf, PROMPT).attentions[1][0]  # (H, T, T) of layer 1
    insp = inspector(model)
    toks = insp.tokens(PROMPT)
    report = insp.attention(toks, AttentionQuery(layers=-1, heads=[0, 3], query_positions=[5, 23], top_k=3,
                                                 precision=6, thumbnail_size=8))
    assert (report["layers"], report["heads"], report["query_positions"]) == ([1], [0, 3], [5, 23])
    weights = as_tensor(report["attention"])  # [layer][head][query][key]
    assert weights.shape == (1, 2, 2, len(PROMPT))
    torch.testing.assert_close(weights[0], expected[[0, 3]][:, [5, 23]].double(), rtol=0, atol=1e-5)
    entropy = -(expected * expected.clamp_min(1e-30).log()).sum(-1)  # (H, T)
    torch.testing.assert_close(as_tensor(report["entropy"][0]), entropy[[0, 3]][:, [5, 23]].mean(-1).double(),
                               rtol=0, atol=1e-5)
    for head_index, head in enumerate([0, 3]):
        for query_index, query in enumerate([5, 23]):
            pairs = report["top_k"][0][head_index][query_index]
            assert [k for k, _ in pairs] == expected[head, query].argsort(descending=True)[:3].tolist()
    thumbs = as_tensor(report["thumbnails"])
    assert thumbs.shape == (1, 2, 8, 8)
    assert torch.allclose(thumbs[0, :, 0, 0], expected[[0, 3], :3, :3].amax((-1, -2)).double(), atol=1e-5)

    mean = insp.attention(toks, AttentionQuery(layers="1:2", heads="all", query_positions="last", aggregate="mean",
                                               precision=6))
    assert as_tensor(mean["attention"]).shape == (1, 1, 1, len(PROMPT))
    torch.testing.assert_close(as_tensor(mean["attention"][0][0][0]), expected[:, -1].mean(0).double(),
                               rtol=0, atol=1e-5)


def test_weights_are_rounded_to_precision(pair) -> None:
    _, model = pair
    insp = inspector(model)
    report = insp.attention(insp.tokens(PROMPT), AttentionQuery(layers=0, heads=0, precision=2, top_k=0))
    values = [v for row in report["attention"][0][0] for v in row]
    assert all(round(v, 2) == v for v in values) and any(0 < v < 1 for v in values)
    assert report["top_k"] == []


def test_logit_lens_matches_transformers_hidden_states(pair) -> None:
    hf, model = pair
    out = hf_outputs(hf, PROMPT)
    insp = inspector(model)
    report = insp.logit_lens(insp.tokens(PROMPT), LensQuery(top_k=4, precision=6))
    assert report["layers"] == [0, 1] and report["positions"] == list(range(len(PROMPT)))
    # The last layer's lens is the model's real next-token distribution.
    final = out.logits[0].softmax(-1).topk(4)
    for position, predictions in enumerate(report["predictions"][-1]):
        assert [p["id"] for p in predictions] == final.indices[position].tolist()
        assert [p["prob"] for p in predictions] == pytest.approx(final.values[position].tolist(), abs=1e-5)
        assert predictions[0]["text"] == f"<{predictions[0]['id']}>"
    # Layer 0: transformers' hidden_states[1] (the residual after block 0) through final norm and head.
    norm = hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f
    with torch.no_grad():
        first = hf.lm_head(norm(out.hidden_states[1][0])).softmax(-1).topk(4)
    assert [p[0]["id"] for p in report["predictions"][0]] == first.indices[:, 0].tolist()
    assert [p[0]["prob"] for p in report["predictions"][0]] == pytest.approx(first.values[:, 0].tolist(), abs=1e-5)


def test_greedy_generation_matches_transformers(pair) -> None:
    hf, model = pair
    with torch.no_grad():
        expected = hf.generate(torch.tensor([PROMPT[:8]]), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    assert greedy_generate(model, PROMPT[:8], 6, stop_ids=set()) == expected
    assert greedy_generate(model, PROMPT[:8], 6, stop_ids={expected[1]}) == expected[:2]


def test_tokens_of_id_prompt_and_generation(pair) -> None:
    _, model = pair
    toks = inspector(model).tokens(PROMPT[:4], max_new_tokens=3)
    assert toks.num_prompt_tokens == 4 and len(toks.ids) == 7 and toks.ids[:4] == PROMPT[:4]
    assert [toks.text[s["start"]:s["end"]] for s in toks.spans] == [s["text"] for s in toks.spans]
    assert toks.text == "".join(f"<{t}>" for t in toks.ids)


def test_limits(pair) -> None:
    _, model = pair
    with pytest.raises(InspectionTooLong, match="limited to 10 tokens"):
        inspector(model, max_tokens=10).tokens(PROMPT)
    with pytest.raises(InspectionTooLong, match="limited to 26 tokens.*24 in the prompt, 3 to generate"):
        inspector(model, max_tokens=26).tokens(PROMPT, max_new_tokens=3)
    small = inspector(model, max_bytes=4096)
    toks = small.tokens(PROMPT)
    with pytest.raises(InspectionTooLarge, match="over the limit of 4096 bytes"):
        small.attention(toks, AttentionQuery())
    assert small.attention(toks, AttentionQuery(layers=0, heads=0, query_positions="last"))["attention"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        small.tokens([1, 96])
    with pytest.raises(ValueError, match="heads: index 4 is out of range"):
        small.attention(toks, AttentionQuery(heads=[4]))


@pytest.mark.parametrize(("spec", "expected"), [
    (None, [0, 1, 2, 3, 4]), ("all", [0, 1, 2, 3, 4]), ("last", [4]), (-2, [3]), ([3, 0, 3], [0, 3]),
    ("1:3", [1, 2]), ("3:", [3, 4]), (":-3", [0, 1]),
])
def test_select(spec, expected: list[int]) -> None:
    assert select(spec, 5, "layers") == expected


@pytest.mark.parametrize(("spec", "message"), [
    (5, "index 5 is out of range"), ([], "empty"), ("4:2", "selects nothing"), ("x", "is not 'all'"),
    ("1:b", "is not 'all'"),
])
def test_select_rejects(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select(spec, 5, "layers")


# ---- the real model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf_path: Path):
    """transformers dequantizing the GGUF to fp32 with eager attention (about a minute), and kvserve's model."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2_gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              local_files_only=True, attn_implementation="eager").eval()
    model, _ = load_model(str(path), "cpu", torch.float32, max_positions=128, progress=False)
    return hf, model


@pytest.mark.slow
def test_smollm2_weights_and_lens_match_transformers(smollm2_pair, smollm2_gguf_path: Path) -> None:
    hf, model = smollm2_pair
    ids = Tokenizer.load(str(smollm2_gguf_path)).encode("The dog chased the llama because it")
    out = hf_outputs(hf, ids)
    with torch.no_grad():
        got = [weights for weights, _ in eager_layers(model, ids)]
    assert len(got) == 30 and got[0].shape == (9, len(ids), len(ids))
    for mine, theirs in zip(got, out.attentions, strict=True):
        torch.testing.assert_close(mine, theirs[0], rtol=0, atol=1e-4)
    insp = inspector(model)
    report = insp.logit_lens(insp.tokens(ids), LensQuery(layers="last", positions="last", top_k=3, precision=6))
    final = out.logits[0, -1].softmax(-1).topk(3)
    assert [p["id"] for p in report["predictions"][0][0]] == final.indices.tolist()
    assert [p["prob"] for p in report["predictions"][0][0]] == pytest.approx(final.values.tolist(), abs=1e-4)
