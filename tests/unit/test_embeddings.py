"""Embeddings: pooled final hidden states against transformers, pooling chosen from the model's config,
batched with generation through the same scheduler, no leaked blocks."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny_engine import add_sentence_transformers_pooling, make_tiny_model_dir
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.pooling import EmbeddingParams, PoolingMethod, read_pooling_method

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!",
         "A paged KV cache stores keys and values in fixed-size blocks. " * 3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def with_pooling(src: str, dst: Path, mode: str) -> str:
    """A copy of the model dir with sentence-transformers files choosing `mode` pooling."""
    shutil.copytree(src, dst)
    return add_sentence_transformers_pooling(dst, mode)


def make_engine(path: str, **options) -> LLMEngine:
    defaults = dict(device="cpu", dtype="float32", quantization="none", block_size=4, max_num_seqs=8,
                    max_num_batched_tokens=64, kv_cache_bytes=2 << 20)
    return LLMEngine(path, EngineConfig(**{**defaults, **options}), progress=False)


def run(engine: LLMEngine, requests: dict[str, tuple[str | list[int], SamplingParams | EmbeddingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def reference(path: str, ids: list[int], method: PoolingMethod, dimensions: int | None = None) -> torch.Tensor:
    """transformers' final hidden states (after the final norm), pooled and L2-normalized."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        states = model.model(torch.tensor([ids])).last_hidden_state[0]
    pooled = {PoolingMethod.LAST: states[-1], PoolingMethod.MEAN: states.mean(0), PoolingMethod.CLS: states[0]}[method]
    return torch.nn.functional.normalize(pooled[:dimensions], dim=0)


@pytest.mark.parametrize("mode, method", [("lasttoken", PoolingMethod.LAST), ("mean_tokens", PoolingMethod.MEAN),
                                          ("cls_token", PoolingMethod.CLS)])
def test_pooled_states_match_transformers(tiny_dir: str, tmp_path: Path, mode: str, method: PoolingMethod) -> None:
    path = with_pooling(tiny_dir, tmp_path / mode, mode)
    assert read_pooling_method(path, "llama") is method
    engine = make_engine(path, max_num_batched_tokens=16)  # the long text is prefilled in several chunks
    ids = [engine.tokenizer.encode(t) for t in TEXTS]
    assert max(len(i) for i in ids) > 16
    done = run(engine, {f"e{i}": (text, EmbeddingParams()) for i, text in enumerate(TEXTS)})
    # Again on the same engine: the prompts' blocks are in the prefix cache now, which must not skip the
    # positions mean and CLS pooling read.
    done |= run(engine, {f"again{i}": (text, EmbeddingParams()) for i, text in enumerate(TEXTS)})
    for i, prompt_ids in [*enumerate(ids), *((f"again{i}", p) for i, p in enumerate(ids))]:
        out = done[i if isinstance(i, str) else f"e{i}"]
        assert out.prompt_token_ids == prompt_ids
        got = torch.tensor(out.embedding)
        torch.testing.assert_close(got, reference(path, prompt_ids, method), rtol=1e-4, atol=1e-4)
        assert abs(got.norm().item() - 1.0) < 1e-5


def test_default_pooling_for_a_decoder_is_last_token(tiny_dir: str) -> None:
    assert read_pooling_method(tiny_dir, "llama") is PoolingMethod.LAST  # no sentence-transformers files


def test_unsupported_pooling_is_named(tiny_dir: str, tmp_path: Path) -> None:
    path = with_pooling(tiny_dir, tmp_path / "max", "max_tokens")
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        read_pooling_method(path, "llama")
    engine = make_engine(path)  # a generation server still starts; the embedding request is refused
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        engine.add_request("e", "Hello", EmbeddingParams())


def test_dimensions_truncate_then_normalize(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir)
    ids = engine.tokenizer.encode(TEXTS[0])
    (out,) = run(engine, {"e": (ids, EmbeddingParams(dimensions=16))}).values()
    assert len(out.embedding) == 16
    torch.testing.assert_close(torch.tensor(out.embedding), reference(tiny_dir, ids, PoolingMethod.LAST, 16),
                               rtol=1e-4, atol=1e-4)


def test_bad_embedding_input(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, max_model_len=32)
    with pytest.raises(ValueError, match="dimensions=65 is larger than this model's embedding size 64"):
        engine.add_request("a", "Hello", EmbeddingParams(dimensions=65))
    with pytest.raises(ValueError, match="maximum context length is 32 tokens, but the input has 33"):
        engine.add_request("b", [5] * 33, EmbeddingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("c", "", EmbeddingParams())
    with pytest.raises(ValueError, match="dimensions must be >= 1"):
        EmbeddingParams(dimensions=0)
    (out,) = run(engine, {"d": ([5] * 32, EmbeddingParams())}).values()  # a full context fits: nothing to generate
    assert len(out.embedding) == 64


def test_batched_with_generation_and_no_blocks_leak(tiny_dir: str) -> None:
    """Embeddings and completions share steps; each answer equals its solo run; every block comes back."""
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randint(3, 60))] for _ in range(6)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    solo_engine = make_engine(tiny_dir, enable_prefix_caching=False)
    solo = {i: run(solo_engine, {"x": (p, EmbeddingParams())})["x"].embedding for i, p in enumerate(prompts)}
    solo_text = run(solo_engine, {"g": (prompts[0], greedy)})["g"].outputs[0].token_ids

    engine = make_engine(tiny_dir, max_num_batched_tokens=24)  # chunked prefills, prefix cache on
    requests = {"g": (prompts[0], greedy)}  # decodes while the embeddings below are prefilled
    requests |= {f"e{i}": (p, EmbeddingParams()) for i, p in enumerate(prompts)}
    requests["e-again"] = (prompts[0], EmbeddingParams())  # its prefix blocks are cached by now
    steps_with_both = 0
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished():
        outputs = engine.step()
        steps_with_both += {s.pooler is None for s in engine.scheduler.running} == {True, False}
        for out in outputs:
            if out.finished:
                done[out.request_id] = out
    assert steps_with_both > 0
    assert done["g"].outputs[0].token_ids == solo_text
    for i in range(len(prompts)):
        torch.testing.assert_close(torch.tensor(done[f"e{i}"].embedding), torch.tensor(solo[i]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(done["e-again"].embedding), torch.tensor(solo[0]), rtol=1e-5, atol=1e-5)
    assert engine.stats().num_kv_blocks_used == 0
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)
    assert engine.stats().prompt_tokens >= sum(len(p) for p in prompts)


def test_aborted_embedding_frees_its_blocks(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, max_num_batched_tokens=8)
    engine.add_request("e", list(range(2, 60)), EmbeddingParams())
    engine.step()
    assert engine.stats().num_kv_blocks_used > 0
    engine.abort("e")
    (out,) = engine.step()
    assert out.finished and out.embedding is None and out.outputs[0].finish_reason == "abort"
    assert engine.stats().num_kv_blocks_used == 0


def test_llm_embed(tiny_dir: str) -> None:
    from engine import LLM

    llm = LLM(tiny_dir, device="cpu", dtype="float32", quantization="none", kv_cache_bytes=2 << 20)
    vectors = llm.embed(TEXTS[:2], dimensions=8)
    assert [len(v) for v in vectors] == [8, 8]
    ids = llm.tokenizer.encode(TEXTS[1])
    torch.testing.assert_close(torch.tensor(vectors[1]), reference(tiny_dir, ids, PoolingMethod.LAST, 8),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pooling_type, method", [(1, PoolingMethod.MEAN), (2, PoolingMethod.CLS),
                                                  (3, PoolingMethod.LAST), (None, PoolingMethod.LAST)])
def test_gguf_pooling_type(tmp_path: Path, pooling_type: int | None, method: PoolingMethod) -> None:
    import gguf

    path = tmp_path / "embed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))  # llama.cpp's {arch}.pooling_type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_pooling_method(path, "llama") is method
