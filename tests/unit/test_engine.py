"""The engine's contracts: batch-invariant greedy output, seeds, preemption, prefix caching, no leaked blocks."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.cpu_formats import build_or_expect_refusal
from helpers.tiny_engine import make_tiny_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from engine import EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def make_engine(path: str, **options) -> LLMEngine:
    defaults = dict(device="cpu", dtype="float32", block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                    kv_cache_bytes=4 << 20)
    return LLMEngine(path, EngineConfig(**{**defaults, **options}), progress=False)


def run_all(engine: LLMEngine, arrivals: list[list[tuple[str, list[int], SamplingParams]]],
            steps_between: int = 2) -> dict[str, list[int]]:
    """Add each group of requests, stepping a few times between groups; run to completion."""
    done: dict[str, list[int]] = {}
    for group in arrivals:
        for request_id, ids, params in group:
            engine.add_request(request_id, ids, params)
        for _ in range(steps_between):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def alone(engine: LLMEngine, ids: list[int], params: SamplingParams) -> list[int]:
    return run_all(engine, [[("alone", ids, params)]])["alone"]


def random_prompts(count: int, seed: int, vocab: int, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def assert_all_free(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_kv_blocks_used == 0
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting


# Every CPU weight format, and a bf16 model, must keep a request's output independent of what else is in
# the batch, or be refused on this CPU (tests/helpers/cpu_formats.py).
FORMATS = [("float32", "none"), ("float32", "bf16"), ("float32", "fp16"), ("float32", "int8"), ("float32", "int4"),
           ("bfloat16", "auto")]


@pytest.mark.parametrize(("dtype", "quantization"), FORMATS)
def test_greedy_batch_equals_alone_with_staggered_arrivals(tiny_dir: str, dtype: str, quantization: str) -> None:
    # batch_invariant: decode rows are batch-invariant in any mode, but a prompt's attention (SDPA) rounds by
    # how it was split: prompts arriving together share the token budget, so their chunks differ from
    # alone, and the runs alone fill the prefix cache (in bf16 that flipped tokens). With it prompt rows go
    # through the paged kernel too, and every format's matmuls must keep rows independent for this to hold.
    engine = build_or_expect_refusal(lambda: make_engine(tiny_dir, dtype=dtype, quantization=quantization,
                                                         batch_invariant=True), dtype, quantization)
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(32, seed=1, vocab=vocab)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [alone(engine, ids, params) for ids in prompts]
    groups = [[(f"r{i}", prompts[i], params) for i in range(start, start + 8)] for start in range(0, 32, 8)]
    got = run_all(engine, groups, steps_between=3)
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want, f"prompt {i} differs when batched"
    assert_all_free(engine)


def test_logprobs_bitwise_equal_next_to_a_much_longer_sequence(tiny_dir: str) -> None:
    """SDPA rounds differently when a sequence's keys are padded to a longer neighbour's length (seen in
    fp32 from ~256 keys padded to ~400+); decodes are grouped by block-table length so that never happens."""
    engine = make_engine(tiny_dir, quantization="none", block_size=16, max_num_batched_tokens=512,
                         kv_cache_bytes=16 << 20)
    vocab = engine.model_config.vocab_size
    # Lengths where it showed: a 270-token context padded to ~490 keys.
    short = random_prompts(1, seed=5, vocab=vocab, lo=270, hi=270)[0]
    long = random_prompts(1, seed=6, vocab=vocab, lo=480, hi=480)[0]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)

    def logprobs_of(request_id: str) -> list[float]:
        values = []
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished and out.request_id == request_id:
                    values = [entry.logprob for entry in out.outputs[0].logprobs]
        return values

    engine.add_request("short", short, params)
    expected = logprobs_of("short")
    engine.add_request("long", long, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()  # the long prompt prefills in one step, then decodes beside the short one
    engine.add_request("short", short, params)
    assert logprobs_of("short") == expected
    assert_all_free(engine)


@pytest.mark.parametrize(("dtype", "quantization"), FORMATS)
def test_seeded_sampling_same_alone_and_batched(tiny_dir: str, dtype: str, quantization: str) -> None:
    engine = build_or_expect_refusal(lambda: make_engine(tiny_dir, dtype=dtype, quantization=quantization),
                                     dtype, quantization)
    prompts = random_prompts(6, seed=2, vocab=engine.model_config.vocab_size)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    expected = alone(engine, prompts[0], seeded)
    others = [(f"o{i}", p, SamplingParams(max_tokens=16, temperature=0.8, seed=i if i % 2 else None, ignore_eos=True))
              for i, p in enumerate(prompts[1:])]
    got = run_all(engine, [others[:2], [("seeded", prompts[0], seeded)], others[2:]])
    assert got["seeded"] == expected
    different_seed = alone(engine, prompts[0], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99,
                                                              ignore_eos=True))
    assert different_seed != expected


def test_preemption_keeps_outputs_identical(tiny_dir: str) -> None:
    roomy = make_engine(tiny_dir)
    prompts = random_prompts(8, seed=3, vocab=roomy.model_config.vocab_size, lo=20, hi=40)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [alone(roomy, ids, params) for ids in prompts]
    # 8 sequences of up to 64 tokens need up to 128 blocks of 4; give them 40.
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K+V, layers, block_size, kv heads, head_dim, fp32 bytes
    tight = make_engine(tiny_dir, kv_cache_bytes=40 * per_block)
    assert tight.stats().num_kv_blocks_total == 40
    got = run_all(tight, [[(f"r{i}", ids, params) for i, ids in enumerate(prompts)]])
    assert tight.stats().num_preemptions > 0
    for i, want in enumerate(expected):
        assert got[f"r{i}"] == want
    assert_all_free(tight)


def test_prefix_cache_computes_a_repeated_prefix_once(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir)
    reference = make_engine(tiny_dir, enable_prefix_caching=False)
    prefix = random_prompts(1, seed=4, vocab=engine.model_config.vocab_size, lo=120, hi=120)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first, second = prefix + [5, 6, 7], prefix + [8, 9]
    out_first = alone(engine, first, params)
    computed_before = engine.stats().prompt_tokens
    out_second = alone(engine, second, params)
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 120 - 4  # all full blocks of the shared prefix
    assert stats.prompt_tokens - computed_before <= len(second) - stats.prefix_cache_hits + 4
    assert out_first == alone(reference, first, params)
    assert out_second == alone(reference, second, params)
    assert_all_free(engine)


def test_n_samples_share_prompt_blocks(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, enable_prefix_caching=False)
    ids = random_prompts(1, seed=5, vocab=engine.model_config.vocab_size, lo=30, hi=30)[0]
    engine.add_request("n", ids, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    assert final is not None and final.finished and len(final.outputs) == 3
    assert engine.stats().prompt_tokens == len(ids)  # the prompt was computed once, not three times
    texts = {tuple(o.token_ids) for o in final.outputs}
    assert len(texts) > 1
    assert all(len(o.token_ids) == 12 for o in final.outputs)
    assert_all_free(engine)


def test_stop_string_across_token_boundaries(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir)
    ids = engine.tokenizer.encode("The quick brown fox")
    free = run_all(engine, [[("free", ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))]])["free"]
    text = engine.tokenizer.decode(free)
    # Pick a stop string that starts inside one token and ends inside a later one.
    pieces = [engine.tokenizer.decode(free[:i]) for i in range(len(free) + 1)]
    start = len(pieces[3]) - 1
    stop = text[start:len(pieces[6]) - 1]
    assert len(stop) >= 2
    engine.add_request("stop", ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == stop
    assert final.outputs[0].text == text[:text.index(stop)]


def test_logprobs_match_reference_log_softmax(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, quantization="none")  # exact fp32 weights
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    ids = random_prompts(1, seed=6, vocab=engine.model_config.vocab_size, lo=12, hi=12)[0]
    alone(engine, ids, SamplingParams(max_tokens=2))  # the prompt is now in the prefix cache
    engine.add_request("lp", ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                                                 prompt_logprobs=2))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    out = final.outputs[0]
    full = ids + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([full])).logits[0].float(), dim=-1)
    for step, entry in enumerate(out.logprobs):
        row = ref[len(ids) - 1 + step]
        assert entry.token_id == out.token_ids[step]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert entry.rank == 1  # greedy picks the best token
    assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(ids)
    for pos, entry in enumerate(final.prompt_logprobs[1:], start=1):
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(ref[pos - 1][ids[pos]].item(), abs=1e-4)


def test_abort_frees_blocks_at_the_next_step(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir)
    prompts = random_prompts(4, seed=7, vocab=engine.model_config.vocab_size)
    for i, ids in enumerate(prompts):
        engine.add_request(f"a{i}", ids, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().num_kv_blocks_used > 0
    for i in range(4):
        engine.abort(f"a{i}")
    outs = engine.step()
    assert {o.request_id for o in outs if o.finished} == {f"a{i}" for i in range(4)}
    assert all(o.outputs[0].finish_reason == "abort" for o in outs)
    assert_all_free(engine)


def test_bad_prompts_are_rejected_with_numbers(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="64"):
        engine.add_request("long", [5] * 70, SamplingParams())
    with pytest.raises(ValueError, match="60 in the prompt"):
        engine.add_request("long2", [5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("vocab", [10**6], SamplingParams())
    assert not engine.has_unfinished()


def test_a_kv_cache_too_small_for_the_context_lowers_it_with_a_warning(tiny_dir: str, caplog) -> None:
    from engine.runner import kv_bytes_per_block

    roomy = make_engine(tiny_dir, max_model_len=64)
    per_block = kv_bytes_per_block(roomy.model_config, torch.float32, 4)
    with caplog.at_level("WARNING", logger="kvserve.engine"):
        small = make_engine(tiny_dir, max_model_len=64, kv_cache_bytes=10 * per_block)  # 10 blocks of 4 tokens
    assert roomy.max_model_len == 64 and small.max_model_len == 40
    [warning] = [r for r in caplog.records if "max_model_len lowered" in r.getMessage()]
    message = warning.getMessage()
    assert "to 40 tokens: 64 asked (--max-model-len)" in message
    assert f"raise --kv-cache-bytes to at least {16 * per_block}" in message
    with pytest.raises(ValueError, match="40"):  # requests see the effective limit
        small.add_request("long", [5] * 41, SamplingParams())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(st.tuples(st.sampled_from(["add", "abort", "step"]), st.integers(0, 7),
                                  st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=40))
def test_random_add_abort_step_never_leaks_blocks(tiny_dir: str, actions) -> None:
    engine = _shared_small_engine(tiny_dir)
    live: set[str] = set()
    counter = 0
    for kind, slot, prompt_len, max_tokens in actions:
        if kind == "add":
            counter += 1
            request_id = f"h{counter}"
            n = 1 + slot % 3
            engine.add_request(request_id, [2 + (slot * 7 + i) % 200 for i in range(prompt_len)],
                               SamplingParams(n=n, max_tokens=max_tokens, temperature=0.7, ignore_eos=True))
            live.add(request_id)
        elif kind == "abort" and live:
            engine.abort(sorted(live)[slot % len(live)])
        else:
            for out in engine.step():
                if out.finished:
                    live.discard(out.request_id)
    for request_id in list(live):
        engine.abort(request_id)
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)


_ENGINES: dict[str, LLMEngine] = {}


def _shared_small_engine(path: str) -> LLMEngine:
    """One engine with a small cache for every hypothesis example (so preemption happens too)."""
    if path not in _ENGINES:
        per_block = 2 * 2 * 4 * 2 * 16 * 4
        _ENGINES[path] = make_engine(path, kv_cache_bytes=48 * per_block, max_num_seqs=8, max_num_batched_tokens=32)
    return _ENGINES[path]


def test_abort_before_fork_closes_every_sample(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, max_num_batched_tokens=16)
    engine.add_request("n", list(range(2, 60)), SamplingParams(n=3, max_tokens=5, temperature=1.0))
    engine.step()  # a first prompt chunk only: the samples have not forked yet
    engine.abort("n")
    (out,) = engine.step()
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort"] * 3
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert_all_free(engine)


def test_logit_rows_lying_in_order_in_one_matrix_are_sampled_without_a_copy() -> None:
    from engine.engine import _as_matrix

    logits = torch.randn(4, 10)
    in_order = _as_matrix([logits[i] for i in range(4)])
    assert torch.equal(in_order, logits) and in_order.data_ptr() == logits.data_ptr()
    later = _as_matrix([logits[i] for i in range(1, 4)])
    assert torch.equal(later, logits[1:]) and later.data_ptr() == logits[1].data_ptr()
    # anything else is stacked: rows out of order, a row twice (n > 1), rows of different tensors, a column
    for rows in ([logits[1], logits[0]], [logits[0], logits[0]], [logits[0], torch.randn(4, 10)[1]],
                 [logits[:, 0], logits[:, 1]]):
        stacked = _as_matrix(rows)
        assert torch.equal(stacked, torch.stack(rows)) and stacked.data_ptr() != logits.data_ptr()
