"""N-gram speculative decoding: the proposer, the config, and greedy output token for token that of plain decoding."""

from __future__ import annotations

import random

import pytest
from helpers.cpu_formats import build_or_expect_refusal
from helpers.integer_kernels import KIND
from helpers.tiny_engine import make_tiny_model_dir
from test_engine import FORMATS, assert_all_free, make_engine, run_all

from engine import LLMEngine, SamplingParams
from engine.models.int4_matmul import int4_kernel_choice
from engine.speculative import NgramConfig, draft_limit, for_kernels, propose, sequence_draft_limit

# Speculate at every batch size the tests use, so batched verify rows are exercised too.
SPEC = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1, disable_by_batch_size=64)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


# ---- the proposer ----

def test_the_latest_occurrence_of_the_longest_ngram_is_copied() -> None:
    config = NgramConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=1)
    #        0  1  2  3  4  5  6  7  8  9 10
    ids = [5, 6, 7, 1, 2, 9, 6, 7, 3, 4, 6, 7]
    # "6 7" occurs at 1-2 and 6-7; the later one (followed by 3 4 6) wins; the 3-gram "x 6 7" never recurs.
    assert propose(ids, config, limit=10) == [3, 4, 6]
    assert propose(ids, config, limit=2) == [3, 4]
    # A longer match beats a more recent shorter one: "9 6 7" matches at 5-7 only via the 3-gram.
    ids = [9, 6, 7, 8, 8, 1, 6, 7, 2, 9, 6, 7]
    assert propose(ids, config, limit=3) == [8, 8, 1]


def test_no_match_or_no_room_proposes_nothing() -> None:
    config = NgramConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2)
    assert propose([1, 2, 3, 4, 5], config, limit=4) == []
    assert propose([1, 2, 1, 2], config, limit=0) == []
    assert propose([7], config, limit=4) == []
    # The match may overlap the tail: a run of one token predicts more of it.
    assert propose([3, 3, 3, 3], config, limit=4) == [3]


def test_drafts_per_sequence_shrink_as_more_sequences_run() -> None:
    # 1 running: up to 5; 2: 2 each; 3 or more: 1 each; past disable_by_batch_size (2 by default) or with nothing
    # running: none.
    assert [draft_limit(NgramConfig(num_speculative_tokens=3), n) for n in range(4)] == [0, 3, 2, 0]
    wide = NgramConfig(num_speculative_tokens=7, disable_by_batch_size=8)
    assert [draft_limit(wide, n) for n in range(10)] == [0, 5, 2, 1, 1, 1, 1, 1, 1, 0]


def test_unset_drafts_are_chosen_for_the_kernels_and_set_ones_kept() -> None:
    assert NgramConfig().num_speculative_tokens is None
    assert for_kernels(NgramConfig(), rows_cost_arithmetic=False).num_speculative_tokens == 3
    assert for_kernels(NgramConfig(), rows_cost_arithmetic=True).num_speculative_tokens == 1
    assert for_kernels(NgramConfig(num_speculative_tokens=2), rows_cost_arithmetic=True).num_speculative_tokens == 2
    assert NgramConfig.parse('{"method": "ngram"}') == NgramConfig()


def test_the_engine_chooses_drafts_for_the_kernels_its_model_runs_on(tiny_dir: str) -> None:
    engine = build_or_expect_refusal(lambda: make_engine(tiny_dir, quantization="int4", speculative=NgramConfig()),
                                     "float32", "int4")
    # The integer kernel's AVX2 build (no VNNI) makes each extra row cost its arithmetic: one draft there.
    drafts = 1 if KIND == "AVX2" and int4_kernel_choice() == "auto" else 3
    assert engine.speculative == NgramConfig(num_speculative_tokens=drafts)
    assert make_engine(tiny_dir, quantization="none", speculative=NgramConfig()).speculative.num_speculative_tokens == 3
    assert make_engine(tiny_dir, speculative=None).speculative is None


def test_a_sequence_whose_drafts_are_turned_down_checks_one_at_a_time() -> None:
    # (limit, draft steps so far, drafts kept over them): new sequences are trusted; below ~0.5 kept a step, 1 draft.
    assert sequence_draft_limit(3, 0, 0) == 3
    assert sequence_draft_limit(3, 1, 0) == 3  # one miss: (0 + 1) >= 0.5 * 2
    assert sequence_draft_limit(3, 2, 0) == 1
    assert sequence_draft_limit(3, 5, 2) == 3 and sequence_draft_limit(3, 6, 2) == 1
    assert sequence_draft_limit(3, 40, 60) == 3
    assert sequence_draft_limit(1, 10, 0) == 1 and sequence_draft_limit(0, 0, 0) == 0


def test_the_engine_keeps_each_sequences_record_and_narrows_its_drafts(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, quantization="none", speculative=SPEC)
    ids = repetitive_prompts(1, seed=5, vocab=engine.model_config.vocab_size)[0]
    engine.add_request("r", ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    narrowed = 0
    while engine.has_unfinished():
        seq = engine.scheduler.running[0] if engine.scheduler.running else None
        record = (seq.num_draft_steps, seq.num_drafts_kept) if seq else (0, 0)
        drafts_before = engine.stats().spec_draft_tokens
        engine.step()
        checked = engine.stats().spec_draft_tokens - drafts_before
        if sequence_draft_limit(SPEC.num_speculative_tokens, *record) == 1:
            assert checked <= 1
            narrowed += checked
    stats = engine.stats()
    assert (seq.num_draft_steps > 0, seq.num_drafts_kept) == (True, stats.spec_accepted_tokens)
    assert narrowed > 0, "the random model's drafts should be turned down often enough to narrow them"


def test_vllm_speculative_config_is_accepted_and_bad_ones_are_refused() -> None:
    parsed = NgramConfig.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (parsed.num_speculative_tokens, parsed.prompt_lookup_max, parsed.prompt_lookup_min) == (5, 4, 2)
    assert NgramConfig.parse({"prompt_lookup_max": 1}).prompt_lookup_min == 1
    for bad, words in [('{"method": "eagle"}', "only 'ngram'"), ("{nope", "not valid JSON"), ("[1]", "JSON object"),
                       ('{"num_speculative_tokens": 0}', ">= 1"), ('{"draft_model": "x"}', "unknown key"),
                       ('{"prompt_lookup_min": 3, "prompt_lookup_max": 2}', "prompt_lookup_min"),
                       ('{"num_speculative_tokens": "4"}', "integer")]:
        with pytest.raises(ValueError, match=words):
            NgramConfig.parse(bad)


# ---- the engine ----

def repetitive_prompts(count: int, seed: int, vocab: int) -> list[list[int]]:
    """Random phrases said two or three times over: the n-gram proposer finds matches in them."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(2, vocab) for _ in range(rng.randint(4, 12))]
        prompts.append([rng.randrange(2, vocab) for _ in range(rng.randint(1, 5))] + phrase * rng.randint(2, 3))
    return prompts


def plain_and_speculative(engine: LLMEngine, arrivals, steps_between: int = 2) -> tuple[dict, dict]:
    """Outputs of the same arrivals without, then with speculation (the same engine, its config switched)."""
    engine.speculative = None
    plain = run_all(engine, arrivals, steps_between)
    engine.speculative = SPEC
    speculative = run_all(engine, arrivals, steps_between)
    return plain, speculative


@pytest.mark.parametrize(("dtype", "quantization"), FORMATS)
def test_greedy_output_is_plain_decodings_alone_and_batched(tiny_dir: str, dtype: str, quantization: str) -> None:
    engine = build_or_expect_refusal(lambda: make_engine(tiny_dir, dtype=dtype, quantization=quantization),
                                     dtype, quantization)
    prompts = repetitive_prompts(12, seed=1, vocab=engine.model_config.vocab_size)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, temperature=0.9, seed=7, ignore_eos=True)  # never speculates
    for i, ids in enumerate(prompts[:4]):  # alone
        plain, speculative = plain_and_speculative(engine, [[(f"a{i}", ids, greedy)]])
        assert speculative == plain, f"prompt {i} alone"
    # Batched with staggered arrivals: prefill chunks, plain decodes and verify rows share steps.
    groups = [[(f"r{i}", ids, sampled if i % 4 == 3 else greedy) for i, ids in enumerate(prompts[j:j + 4], j)]
              for j in range(0, 12, 4)]
    drafts_before = engine.stats().spec_draft_tokens
    plain, speculative = plain_and_speculative(engine, groups, steps_between=3)
    assert speculative == plain
    stats = engine.stats()
    assert stats.spec_accepted_tokens > 0, "no draft was ever accepted: the test checks nothing"
    assert stats.spec_draft_tokens - drafts_before > stats.spec_accepted_tokens, "no draft was ever rejected"
    assert_all_free(engine)


def test_logprobs_stop_strings_and_max_tokens_end_where_plain_decoding_does(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, quantization="none")
    prompts = repetitive_prompts(6, seed=2, vocab=engine.model_config.vocab_size)
    # The stop string is a piece of plain decoding's text, so it matches partway through some verify step.
    engine.add_request("probe", prompts[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            text = out.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = [SamplingParams(max_tokens=30, temperature=0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3, min_tokens=5),
              SamplingParams(max_tokens=30, temperature=0, n=2, ignore_eos=True)]

    def outputs(speculative: NgramConfig | None) -> list:
        engine.speculative = speculative
        for i, (ids, p) in enumerate(zip(prompts, params, strict=False)):
            engine.add_request(f"q{i}", ids, p)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = [(o.text, o.token_ids, o.finish_reason, o.stop_reason,
                                             o.logprobs)
                                            for o in out.outputs]
        return [done[f"q{i}"] for i in range(len(params))]

    assert outputs(SPEC) == outputs(None)
    assert engine.stats().spec_accepted_tokens > 0
    assert_all_free(engine)


def test_preemption_and_context_limits_keep_outputs_and_free_every_block(tiny_dir: str) -> None:
    # A cache of 24 blocks of 4 for 6 sequences of ~60 tokens: sequences are preempted and recomputed, and
    # drafts must never push one past the context (max_model_len 64).
    roomy = make_engine(tiny_dir, quantization="none", max_model_len=64)
    block_bytes = roomy.runner.kv_cache[:, :, 0].numel() * roomy.runner.kv_cache.element_size()
    tight = make_engine(tiny_dir, quantization="none", max_model_len=64, kv_cache_bytes=24 * block_bytes)
    prompts = repetitive_prompts(6, seed=3, vocab=roomy.model_config.vocab_size)
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    arrivals = [[(f"p{i}", ids, params) for i, ids in enumerate(prompts)]]
    roomy.speculative = None
    expected = run_all(roomy, arrivals)
    tight.speculative = SPEC
    assert run_all(tight, arrivals) == expected
    assert tight.scheduler.num_preemptions > 0, "the cache was large enough: nothing was preempted"
    assert all(len(expected[f"p{i}"]) + len(ids) == 64 for i, ids in enumerate(prompts))
    assert_all_free(tight)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_windows_and_softcaps_verify_like_plain_decodes(family: str, tmp_path) -> None:
    """Mistral: every layer slides and blocks out of the window go back mid-generation; Gemma 2: local and
    global layers, soft-capped scores. Verify rows take the window masks a decode at their position has."""
    from helpers.tiny_engine import _tokenizer
    from helpers.tiny_families import tiny_gemma2, tiny_mistral
    from helpers.tiny_models import save_hf

    from engine.llm import LLM

    save_hf({"mistral": tiny_mistral, "gemma2": tiny_gemma2}[family](), tmp_path)
    _tokenizer().save(str(tmp_path / "tokenizer.json"))
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", quantization="none", max_model_len=128, block_size=4)
    prompts = repetitive_prompts(3, seed=4, vocab=llm.engine.model_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=1)

    def run(speculative: NgramConfig | None) -> list:
        llm.engine.speculative = speculative
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in
                [llm.generate(ids, params)[0] for ids in prompts]]

    assert run(SPEC) == run(None)
    assert llm.engine.stats().spec_accepted_tokens > 0
    assert_all_free(llm.engine)


# ---- sampled requests: speculative sampling ----

def test_speculative_sampling_draws_each_token_from_plain_samplings_distribution() -> None:
    """Draft j is kept with probability p_j(draft), else a token is drawn from p_j without it: the first token
    must follow p_0 and, after a kept first draft, the second p_1 (frequencies over many trials)."""
    import torch

    from engine.sampling import SamplingRow, verify_drafts

    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    drafts = [int(logits[0].argmax()), int(logits[1].argsort()[-2])]  # a likely draft, then a less likely one
    rows = [SamplingRow(params, [1], drafts[:j]) for j in range(3)]
    trials = 6000
    firsts, seconds = torch.zeros(6), torch.zeros(6)
    lengths = set()
    for _ in range(trials):
        tokens = [token for token, _ in verify_drafts(logits, rows, drafts)]
        lengths.add(len(tokens))
        firsts[tokens[0]] += 1
        if tokens[0] == drafts[0]:
            seconds[tokens[1]] += 1
    def expected(row: int) -> torch.Tensor:  # temperature, then top-k 5 (the smallest logit masked)
        scaled = logits[row] / 0.8
        return scaled.masked_fill(scaled == scaled.min(), float("-inf")).softmax(-1)

    assert torch.allclose(firsts / trials, expected(0), atol=0.02)
    assert torch.allclose(seconds / seconds.sum(), expected(1), atol=0.03)
    assert firsts[int(logits[0].argmin())] == 0  # top-k's masked token is never drawn, draft or not
    assert lengths == {1, 2, 3}  # rejected at the first draft, at the second, and both kept plus one more


def test_unseeded_sampled_requests_speculate_and_seeded_ones_do_not(tiny_dir: str) -> None:
    engine = make_engine(tiny_dir, quantization="none")
    engine.speculative = SPEC
    prompts = repetitive_prompts(4, seed=1, vocab=engine.model_config.vocab_size)
    seeded = SamplingParams(max_tokens=30, temperature=0.7, seed=3, ignore_eos=True)
    engine.speculative = None
    plain = run_all(engine, [[(f"s{i}", ids, seeded) for i, ids in enumerate(prompts)]])
    engine.speculative = SPEC
    assert run_all(engine, [[(f"s{i}", ids, seeded) for i, ids in enumerate(prompts)]]) == plain
    assert engine.stats().spec_draft_tokens == 0
    # The random model rarely repeats itself (a few drafts kept in ~300); the real model's rate is in the
    # integration test. Deterministic: the engine seeds torch's generator at start.
    unseeded = SamplingParams(max_tokens=80, temperature=0.3, ignore_eos=True, logprobs=1)
    got = run_all(engine, [[(f"u{i}", ids, unseeded) for i, ids in enumerate(prompts)]])
    assert all(len(tokens) == 80 for tokens in got.values())
    assert engine.stats().spec_accepted_tokens > 0
    assert_all_free(engine)
