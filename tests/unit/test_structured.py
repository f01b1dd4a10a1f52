"""Constrained decoding in the engine: every output that finishes with "stop" matches its constraint, for
greedy, seeded and n > 1 requests, in batches shared with unguided requests, across preemption."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from helpers.tiny_engine import make_tiny_model_dir

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.grammar import GrammarError, bitmask_to_bias
from engine.sampling import SamplingRow, sample
from engine.structured import StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 3, "maximum": 70},
        "kind": {"enum": ["cat", "dog"]},
        "code": {"type": "string", "pattern": "^[a-c]{2,3}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
        "owner": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False},
        "size": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    },
    "required": ["id", "kind", "code", "tags", "owner", "size"],
    "additionalProperties": False,
}
GBNF = 'root ::= "(" item ("," item)? ")"\nitem ::= [a-c] [a-c]?'

# (constraint, a check of the text it must produce)
CASES = {
    "json": (StructuredOutput("json", json.dumps(SCHEMA)), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "json_object": (StructuredOutput("json_object"), lambda text: isinstance(json.loads(text), dict) or fail(text)),
    "regex": (StructuredOutput("regex", r"[0-9]{2,4}-(ab|cd)"),
              lambda text: re.fullmatch(r"[0-9]{2,4}-(ab|cd)", text) or fail(text)),
    "choice": (StructuredOutput("choice", ("yes", "no", "maybe so")),
               lambda text: text in ("yes", "no", "maybe so") or fail(text)),
    "grammar": (StructuredOutput("grammar", GBNF), lambda text: re.fullmatch(r"\([a-c]{1,2}(,[a-c]{1,2})?\)", text)
                or fail(text)),
}


# Constraints whose every match is short: a random model must finish them within max_tokens.
BOUNDED = {"json", "regex", "choice", "grammar"}


def fail(text: str) -> None:
    raise AssertionError(f"output does not match: {text!r}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def make_engine(path: str, **options) -> LLMEngine:
    defaults = dict(device="cpu", dtype="float32", block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                    kv_cache_bytes=4 << 20)
    return LLMEngine(path, EngineConfig(**{**defaults, **options}), progress=False)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Run requests together to completion; each request's CompletionOutputs."""
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs
    return done


@pytest.fixture(scope="module")
def engine(tiny_dir: str) -> LLMEngine:
    return make_engine(tiny_dir)


@pytest.mark.parametrize("name", CASES)
def test_every_stopped_output_matches(engine: LLMEngine, name: str) -> None:
    spec, check = CASES[name]
    prompt = engine.tokenizer.encode("The quick brown fox")
    requests = {
        "greedy": (prompt, SamplingParams(max_tokens=120, temperature=0, structured_output=spec)),
        "seeded": (prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=5, n=3, structured_output=spec)),
        "unseeded": (prompt, SamplingParams(max_tokens=120, temperature=1.2, n=2, structured_output=spec)),
    }
    outputs = [o for outs in run(engine, requests).values() for o in outs]
    stopped = [o for o in outputs if o.finish_reason == "stop"]
    assert stopped and (name not in BOUNDED or len(stopped) == len(outputs)), [
        (o.text, o.finish_reason) for o in outputs]
    for out in stopped:
        check(out.text)
    assert engine.stats().num_kv_blocks_used == 0


def test_complete_grammar_stops_without_eos_and_length_cuts(engine: LLMEngine) -> None:
    prompt = engine.tokenizer.encode("Hello world")
    eos = engine.tokenizer.eos_token_id
    done = run(engine, {
        "one": (prompt, SamplingParams(max_tokens=50, temperature=0, structured_output=StructuredOutput(
            "choice", ("Bonjour",)))),
        "cut": (prompt, SamplingParams(max_tokens=4, temperature=0, structured_output=StructuredOutput(
            "regex", "[a-z]{40}"))),
    })
    (one,), (cut,) = done["one"], done["cut"]
    assert (one.text, one.finish_reason) == ("Bonjour", "stop") and eos not in one.token_ids
    assert cut.finish_reason == "length" and len(cut.token_ids) == 4 and re.fullmatch("[a-z]+", cut.text)


def test_eos_only_where_the_grammar_accepts(engine: LLMEngine) -> None:
    """The model is pushed hard towards eos; it may take it only once the regex is satisfied."""
    eos = engine.tokenizer.eos_token_id
    prompt = engine.tokenizer.encode("1234")
    params = SamplingParams(max_tokens=30, temperature=0, logit_bias={eos: 100.0},
                            structured_output=StructuredOutput("regex", "[0-9]{3,}"))
    (out,) = run(engine, {"r": (prompt, params)})["r"]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert re.fullmatch("[0-9]{3,}", out.text), out.text
    # eos came at the first token boundary where the regex was satisfied, not before, not later.
    prefixes = [engine.tokenizer.decode(out.token_ids[:k]) for k in range(1, len(out.token_ids) - 1)]
    assert not any(re.fullmatch("[0-9]{3,}", p) for p in prefixes), prefixes


def test_guided_rows_leave_unguided_neighbours_unchanged(engine: LLMEngine) -> None:
    prompts = [engine.tokenizer.encode(t) for t in ("The lazy dog", "Continuous batching", "Hola mundo")]
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.9, seed=11, ignore_eos=True)
    alone = run(engine, {"a": (prompts[0], plain), "b": (prompts[1], seeded)})
    guided = SamplingParams(max_tokens=60, temperature=1.0, seed=2, n=2,
                            structured_output=CASES["json"][0])
    mixed = run(engine, {"a": (prompts[0], plain), "g": (prompts[2], guided), "b": (prompts[1], seeded)})
    assert mixed["a"][0].token_ids == alone["a"][0].token_ids
    assert mixed["b"][0].token_ids == alone["b"][0].token_ids


def test_preemption_rebuilds_matchers(tiny_dir: str) -> None:
    """Recompute after preemption replays each sample's tokens into a fresh matcher: same outputs as without."""
    spec, check = CASES["json"]
    roomy = make_engine(tiny_dir)
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K+V, layers, block_size, kv heads, head_dim, fp32 bytes
    tight = make_engine(tiny_dir, kv_cache_bytes=40 * per_block)
    prompts = [roomy.tokenizer.encode(t) * 3 for t in ("The quick brown fox", "A paged KV cache", "Hello world!",
                                                        "Bonjour le monde", "Hola mundo 1234")]
    requests = {f"r{i}": (ids, SamplingParams(max_tokens=60, temperature=1.0, seed=i, n=2, structured_output=spec))
                for i, ids in enumerate(prompts)}
    expected = run(roomy, requests)
    got = run(tight, requests)
    assert tight.stats().num_preemptions > 0
    for request_id, outputs in expected.items():
        assert [o.token_ids for o in got[request_id]] == [o.token_ids for o in outputs]
        for out in got[request_id]:
            if out.finish_reason == "stop":
                check(out.text)
    assert tight.stats().num_kv_blocks_used == 0


@pytest.mark.parametrize(("spec", "message"), [
    (StructuredOutput("json", '{"type": "wat"}'), "wat"),
    (StructuredOutput("json", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
    (StructuredOutput("json", '{"not": {"type": "string"}}'), "not"),
    (StructuredOutput("json", "{nope"), "not valid JSON"),
    (StructuredOutput("regex", "a(b"), "unclosed group"),
    (StructuredOutput("grammar", 'root ::= "a" | undefined'), "undefined"),
])
def test_unenforceable_specs_are_refused(engine: LLMEngine, spec: StructuredOutput, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        engine.add_request("bad", [5, 6, 7], SamplingParams(structured_output=spec))
    assert not engine.has_unfinished()


def test_compiled_grammars_are_cached(engine: LLMEngine) -> None:
    spec = StructuredOutput("json", json.dumps(SCHEMA))
    assert engine.grammars.compile(spec) is engine.grammars.compile(StructuredOutput("json", json.dumps(SCHEMA)))


def test_sampler_applies_the_bitmask_per_row() -> None:
    torch.manual_seed(0)
    vocab = 70
    logits = torch.randn(4, vocab)
    allowed = [{5, 64}, None, {0, 33, 69}, {12}]
    rows = []
    for i, tokens in enumerate(allowed):
        bitmask = None
        if tokens is not None:
            bitmask = torch.zeros(3, dtype=torch.int32)
            for t in tokens:
                bitmask[t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 wraps to negative
        rows.append(SamplingRow(SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, logprobs=2), [1], [],
                                token_bitmask=bitmask))
    for _ in range(10):
        chosen = sample(logits, rows)
        for (token, logprob), tokens in zip(chosen, allowed, strict=True):
            if tokens is not None:
                assert token in tokens
                assert {t for t, _ in logprob.top} <= tokens  # masked tokens are not alternatives either
    assert chosen[1][0] == int(logits[1].argmax())


def test_bitmask_bias_matches_bits() -> None:
    words = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)
    bias = bitmask_to_bias(words, 100)
    assert bias.shape == (3, 100)
    for b in range(3):
        for t in range(100):
            allowed = bool((int(words[b, t // 32]) >> (t % 32)) & 1)
            assert float(bias[b, t]) == (0.0 if allowed else float("-inf"))
