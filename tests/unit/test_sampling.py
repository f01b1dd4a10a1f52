"""The batched sampler against plain, loop-based references (numpy float64) and statistical checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.sampling import (
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    make_generator,
    prompt_logprobs,
    sample,
)
from engine.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NEG_INF = float("-inf")


def make_row(prompt: list[int] | None = None, output: list[int] | None = None, eos: set[int] | None = None,
             index: int = 0, device: str = "cpu", **params: object) -> SamplingRow:
    p = SamplingParams(**params)
    return SamplingRow(p, prompt or [], output or [], make_generator(p.seed, index, device), eos or set())


# ---- plain references -------------------------------------------------------------------------------

def ref_softmax(logits: list[float]) -> list[float]:
    finite = [x for x in logits if x != NEG_INF]
    top = max(finite)
    exps = [math.exp(x - top) if x != NEG_INF else 0.0 for x in logits]
    total = sum(exps)
    return [e / total for e in exps]


def ref_top_k(logits: list[float], k: int) -> list[bool]:
    if k <= 0 or k > len(logits):
        return [True] * len(logits)
    kth = sorted(logits, reverse=True)[k - 1]
    return [x >= kth for x in logits]


def ref_top_p(logits: list[float], p: float) -> tuple[list[bool], bool]:
    """Keep mask and whether float32 rounding could decide it (a running sum or a probability near the cut)."""
    probs = ref_softmax(logits)
    if p >= 1.0:
        return [True] * len(logits), False
    running, cutoff, close = 0.0, 0.0, False
    for q in sorted(probs, reverse=True):
        running += q
        close |= abs(running - p) < 1e-5
        if running >= p:
            cutoff = q
            break
    close |= any(q != cutoff and abs(q - cutoff) < 1e-6 for q in probs)
    return [q >= cutoff for q in probs], close


def ref_min_p(logits: list[float], min_p: float) -> tuple[list[bool], bool]:
    probs = ref_softmax(logits)
    threshold = min_p * max(probs)
    close = any(q != threshold and abs(q - threshold) < 1e-6 for q in probs)
    return [q >= threshold for q in probs], close


def ref_penalties(logits: list[float], prompt: list[int], output: list[int], rep: float, freq: float,
                  pres: float) -> list[float]:
    result = []
    for token, x in enumerate(logits):
        if token in prompt or token in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(token)
        result.append(x - freq * count - pres * (count > 0))
    return result


def ref_processed(logits: list[float], row: SamplingRow) -> list[float]:
    """logit_bias, then min_tokens, then penalties, one token at a time."""
    p = row.params
    x = [v + p.logit_bias.get(t, 0.0) for t, v in enumerate(logits)]
    if len(row.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else row.eos_token_ids)
        x = [NEG_INF if t in banned else v for t, v in enumerate(x)]
    return ref_penalties(x, row.prompt_token_ids, row.output_token_ids, p.repetition_penalty,
                         p.frequency_penalty, p.presence_penalty)


def ref_allowed(logits: list[float], p: SamplingParams) -> list[bool]:
    """Tokens a random row may draw: temperature, then top-k, top-p, min-p, each on what is left."""
    x = [v / p.temperature for v in logits]
    for keep in (ref_top_k(x, p.top_k), ref_top_p(x, p.top_p)[0], ref_min_p(x, p.min_p)[0]):
        x = [v if k else NEG_INF for v, k in zip(x, keep, strict=True)]
    return [v != NEG_INF for v in x]


# ---- strategies -------------------------------------------------------------------------------------

@st.composite
def logit_rows(draw: st.DrawFn, max_rows: int = 4, max_vocab: int = 12) -> list[list[float]]:
    """Rows of logits: sometimes small integers (many ties), sometimes floats, a few -inf (never all)."""
    vocab = draw(st.integers(1, max_vocab))
    tied = draw(st.booleans())
    value = st.integers(-3, 3).map(float) if tied else st.floats(-20, 20, width=32)
    rows = draw(st.lists(st.lists(value, min_size=vocab, max_size=vocab), min_size=1, max_size=max_rows))
    for row in rows:
        for token in draw(st.lists(st.integers(0, vocab - 1), max_size=vocab // 3)):
            row[token] = NEG_INF
    return rows


probabilities = st.one_of(st.just(1.0), st.just(0.5), st.floats(0.01, 1.0))


def masks(out: torch.Tensor) -> list[list[bool]]:
    return (out > NEG_INF).tolist()


# ---- truncation masks -------------------------------------------------------------------------------

@settings(deadline=None)
@given(logit_rows(), st.data())
def test_top_k_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    ks = [data.draw(st.integers(0, len(rows[0]) + 2)) for _ in rows]
    out = apply_top_k(torch.tensor(rows), ks)
    expected = [[k and x != NEG_INF for k, x in zip(ref_top_k(r, k), r, strict=True)] for r, k in zip(rows, ks, strict=True)]
    assert masks(out) == expected
    assert torch.equal(out[out > NEG_INF], torch.tensor(rows)[out > NEG_INF])  # kept logits unchanged


@settings(deadline=None)
@given(logit_rows(), st.data())
def test_top_p_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    ps = [data.draw(probabilities) for _ in rows]
    refs = [ref_top_p(r, p) for r, p in zip(rows, ps, strict=True)]
    assume(not any(close for _, close in refs))
    out = apply_top_p(torch.tensor(rows), ps)
    expected = [[k and x != NEG_INF for k, x in zip(keep, r, strict=True)] for (keep, _), r in zip(refs, rows, strict=True)]
    assert masks(out) == expected


@settings(deadline=None)
@given(logit_rows(), st.data())
def test_min_p_matches_reference(rows: list[list[float]], data: st.DataObject) -> None:
    min_ps = [data.draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))) for _ in rows]
    refs = [ref_min_p(r, m) for r, m in zip(rows, min_ps, strict=True)]
    assume(not any(close for _, close in refs))
    out = apply_min_p(torch.tensor(rows), min_ps)
    expected = [[k and x != NEG_INF for k, x in zip(keep, r, strict=True)] for (keep, _), r in zip(refs, rows, strict=True)]
    assert masks(out) == expected


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_top_p_on_a_large_vocabulary_keeps_the_smallest_sufficient_set(scale: float) -> None:
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(4)) * scale
    ps = [0.3, 0.9, 0.999, 1.0]
    kept = apply_top_p(logits, ps) > NEG_INF
    probs = logits.double().softmax(dim=-1)
    for row, p in enumerate(ps):
        mass = float(probs[row][kept[row]].sum())
        smallest_kept = probs[row][kept[row]].min()
        assert bool((probs[row][~kept[row]] < smallest_kept).all())  # the kept set is a top set
        assert mass >= p - 1e-5
        # Without its least likely token the kept set would fall short of p.
        assert p == 1.0 or mass - float(smallest_kept) < p + 1e-5
    assert bool(kept[3].all())


def test_edge_values_keep_everything() -> None:
    logits = torch.tensor([[0.5, 0.5, -1.0, 3.0, -30.0]])
    assert torch.equal(apply_top_k(logits, [9]), logits)
    assert torch.equal(apply_top_k(logits, [0]), logits)
    assert torch.equal(apply_top_p(logits, [1.0]), logits)
    assert torch.equal(apply_min_p(logits, [0.0]), logits)
    # A tie at the k-th place keeps both tied tokens.
    assert masks(apply_top_k(logits, [2])) == [[True, True, False, True, False]]


# ---- penalties, bias, min_tokens --------------------------------------------------------------------

@settings(deadline=None)
@given(logit_rows(max_vocab=8), st.data())
def test_penalties_match_reference(rows: list[list[float]], data: st.DataObject) -> None:
    vocab = len(rows[0])
    ids = st.lists(st.integers(0, vocab - 1), max_size=10)
    sampling_rows = [make_row(data.draw(ids), data.draw(ids),
                              repetition_penalty=data.draw(st.floats(0.5, 2.0)),
                              frequency_penalty=data.draw(st.floats(-2, 2)),
                              presence_penalty=data.draw(st.floats(-2, 2))) for _ in rows]
    out = apply_penalties(torch.tensor(rows), sampling_rows)
    expected = [ref_penalties(r, s.prompt_token_ids, s.output_token_ids, s.params.repetition_penalty,
                              s.params.frequency_penalty, s.params.presence_penalty)
                for r, s in zip(rows, sampling_rows, strict=True)]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_blocks_eos_and_stop_tokens(device: str) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0, 8.0]] * 4, device=device)
    rows = [
        make_row(output=[1], eos={4}, min_tokens=3, stop_token_ids=[5], temperature=0),
        make_row(output=[1, 1, 1], eos={4}, min_tokens=3, stop_token_ids=[5], temperature=0),
        make_row(output=[], eos={4}, min_tokens=3, stop_token_ids=[5], ignore_eos=True, temperature=0),
        make_row(output=[], eos={4, 5}, min_tokens=1, logprobs=2),
    ]
    (a, _), (b, _), (c, _), (d, d_logprob) = sample(logits, rows)
    assert (a, b, c) == (3, 4, 4)
    assert d not in (4, 5)
    assert d_logprob is not None and [t for t, _ in d_logprob.top] == [3, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_forces_and_forbids(device: str) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator).to(device)
    forced = [make_row(logit_bias={7: 100.0}, seed=i) for i in range(32)]
    forbidden = [make_row(logit_bias={int(logits[32 + i].argmax()): -100.0}, temperature=0) for i in range(32)]
    tokens = [t for t, _ in sample(logits, forced + forbidden)]
    assert tokens[:32] == [7] * 32
    second_best = logits[32:].topk(2, dim=-1).indices[:, 1].tolist()
    assert tokens[32:] == second_best


# ---- greedy, logprobs -------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_alone_and_in_a_mixed_batch(device: str) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(device)
    all_greedy = sample(logits, [make_row(temperature=0) for _ in range(6)])
    assert [t for t, _ in all_greedy] == logits.argmax(-1).tolist()
    mixed = [make_row(temperature=0) if i % 2 else make_row(temperature=1.5, top_p=0.9, seed=i) for i in range(6)]
    tokens = [t for t, _ in sample(logits, mixed)]
    assert tokens[1::2] == logits[1::2].argmax(-1).tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6))
def test_logprobs_match_log_softmax_of_reference_logits(seed: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    vocab = 20
    logits = torch.randn(batch, vocab, generator=gen) * 3
    picks = torch.randint(0, vocab, (batch, 6), generator=gen).tolist()
    rows = [make_row(prompt=pick[:3], output=pick[3:], eos={pick[0]}, min_tokens=i % 2 * 5,
                     logit_bias={pick[1]: 2.5}, repetition_penalty=1.3, frequency_penalty=0.4,
                     presence_penalty=-0.2, temperature=[0, 0.7, 1.0][i % 3], top_k=i % 4,
                     logprobs=i % 4 if i != 2 else None, seed=seed + i)
            for i, pick in enumerate(picks)]
    results = sample(logits, rows)
    for row, logit_row, (token, entry) in zip(rows, logits.tolist(), results, strict=True):
        processed = ref_processed(logit_row, row)
        if row.is_greedy:
            assert token == int(np.argmax(processed))
        if row.params.logprobs is None:
            assert entry is None
            continue
        expected = torch.log_softmax(torch.tensor(processed, dtype=torch.float64), dim=-1)
        assert entry is not None and entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert entry.rank == 1 + int((expected > expected[token] + 1e-6).sum())
        assert len(entry.top) == row.params.logprobs
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)
        best = expected.topk(row.params.logprobs)
        assert [t for t, _ in entry.top] == best.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_log_softmax() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    next_ids = [3, 0, 29, 7, 7]
    entries = prompt_logprobs(logits, next_ids, 3)
    expected = torch.log_softmax(logits.double(), dim=-1)
    for t, (entry, token) in enumerate(zip(entries, next_ids, strict=True)):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(float(expected[t, token]), abs=1e-5)
        assert entry.rank == 1 + int((expected[t] > expected[t, token]).sum())
        assert [i for i, _ in entry.top] == expected[t].topk(3).indices.tolist()
    assert prompt_logprobs(logits[:0], [], 3) == []
    # Long prompts are processed in chunks; the chunk seams must not show.
    long_logits = torch.randn(600, 30, generator=torch.Generator().manual_seed(5))
    long_ids = torch.randint(0, 30, (600,), generator=torch.Generator().manual_seed(6)).tolist()
    long_entries = prompt_logprobs(long_logits, long_ids, 2)
    expected_long = torch.log_softmax(long_logits.double(), dim=-1)
    assert [e.token_id for e in long_entries] == long_ids
    assert [e.logprob for e in long_entries] == pytest.approx(
        expected_long.gather(1, torch.tensor(long_ids).unsqueeze(1)).squeeze(1).tolist(), abs=1e-5)
    with pytest.raises(ValueError):
        prompt_logprobs(logits, next_ids[:2], 3)


# ---- randomness -------------------------------------------------------------------------------------

def run_steps(step_logits: list[torch.Tensor], seed: int, others: int) -> list[int]:
    """Sample a seeded row (with penalties, so its history matters) for several steps among `others` rows."""
    target = make_row(prompt=[1, 2], seed=seed, temperature=0.9, top_p=0.95, repetition_penalty=1.2)
    tokens = []
    for step, logits in enumerate(step_logits):
        neighbours = [make_row(seed=100 + j if j % 2 else None, index=step, temperature=1.3, top_k=5)
                      for j in range(others)]
        batch = neighbours[: others // 2] + [target] + neighbours[others // 2:]
        # The target's logits are the same at each step; the neighbours see fresh noise.
        full = torch.randn(len(batch), logits.shape[0])
        full[others // 2] = logits
        token, _ = sample(full, batch)[others // 2]
        target.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_row_ignores_its_batch_and_seeds_differ() -> None:
    gen = torch.Generator().manual_seed(3)
    step_logits = [torch.randn(40, generator=gen) for _ in range(30)]
    alone = run_steps(step_logits, seed=42, others=0)
    assert run_steps(step_logits, seed=42, others=3) == alone
    assert run_steps(step_logits, seed=42, others=6) == alone
    assert run_steps(step_logits, seed=43, others=3) != alone
    assert len(set(alone)) > 5  # really random, not stuck on the argmax


def test_make_generator() -> None:
    assert make_generator(None, 0, "cpu") is None
    draw = [torch.rand(4, generator=make_generator(s, i, "cpu")).tolist() for s, i in [(5, 0), (5, 0), (5, 1), (6, 0)]]
    assert draw[0] == draw[1]
    assert draw[0] != draw[2] and draw[0] != draw[3]


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    kept = expected > 0
    assert counts[~kept].sum() == 0, "sampled a token of probability 0"
    return float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())


@pytest.mark.parametrize(("params", "seeded"), [
    ({"temperature": 0.8}, False),
    ({"temperature": 0.8}, True),
    ({"temperature": 1.5, "top_k": 4}, True),
    ({"temperature": 1.0, "top_p": 0.8}, False),
    ({"temperature": 1.0, "min_p": 0.2, "top_k": 6}, True),
])
def test_sampling_frequencies_match_probabilities(params: dict, seeded: bool) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -3.0])
    draws = 4000
    rows = [make_row(seed=11 if seeded else None, index=i, **params) for i in range(draws)]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokens = [t for t, _ in sample(logits.expand(draws, -1), rows)]
    p = SamplingParams(**params)
    allowed = np.array(ref_allowed(logits.tolist(), p))
    scaled = np.where(allowed, logits.numpy() / p.temperature, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    counts = np.bincount(tokens, minlength=len(logits))
    # 7 degrees of freedom at most; 24.3 is the 0.999 quantile, and the fixed seeds make this deterministic.
    assert chi_square(counts, probs) < 24.3
    assert (counts[allowed] > 0).all()
