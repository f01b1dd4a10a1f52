"""Batched token sampler: logit bias, min_tokens, penalties, logprobs, temperature, top-k/top-p/min-p, seeds.

Order of operations on a [B, V] batch of logits (one row per sequence):

0. Structured output: rows with a grammar get every token their grammar forbids set to -inf, by one
   index_add_ of a 0 / -inf bias over those rows (made from the packed bitmasks, engine/grammar.py).
   Nothing later can bring a -inf back, so the chosen token is always one the grammar allows.
1. logit_bias is added.
2. min_tokens: while a row has fewer outputs than `min_tokens`, its stop_token_ids and (unless
   ignore_eos) its eos ids are set to -inf (vLLM's rule).
3. Penalties: repetition over prompt + output tokens (positive logits divided, negative multiplied,
   as HF and vLLM do), then frequency and presence over output tokens (OpenAI's formula).
4. Logprobs are taken here, from the log-softmax of these *processed* logits, before temperature and
   truncation (vLLM's "processed_logprobs"): they describe the model as adjusted by the request, not the
   truncated sampling distribution, so top alternatives stay meaningful whatever top_k/top_p say.
5. Greedy rows (temperature < 1e-5) take the argmax. Other rows: divide by temperature, then top-k,
   top-p and min-p masks, each on the distribution the previous one left; ties at a cut-off are kept.
6. Random rows draw by inverse CDF: one uniform u per row, the first token whose running sum of
   probabilities passes u times the total. A seeded row draws u from its own generator, so its tokens do
   not depend on the rest of the batch. (The exponential trick, argmax(p / q) with q ~ Exp(1) per token,
   needed a random number per vocabulary entry: 0.7 ms a row for 49k tokens on a CPU, 44 ms a step at
   batch 64; inverse CDF costs ~0.04 ms a row.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.grammar import bitmask_to_bias
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams

# Dividing by a smaller temperature can overflow float32 logits; such rows are sampled greedily.
MIN_TEMPERATURE = 1e-5
# How many of the most likely tokens top-p looks at first (see apply_top_p).
_TOP_P_FIRST_WIDTH = 256
# Prompt positions whose log-softmax prompt_logprobs holds at once.
_PROMPT_LOGPROBS_CHUNK = 256


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know about one sequence for one step (one row of the logits)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    token_bitmask: torch.Tensor | None = None  # int32 [ceil(V / 32)]: bit t set = the grammar allows token t

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def banned_by_min_tokens(self) -> set[int]:
        """Token ids that may not be sampled yet because min_tokens is not reached. A grammar outranks
        min_tokens: once it is complete only a stop token is left, and banning it would leave nothing."""
        if len(self.output_token_ids) >= self.params.min_tokens or self.token_bitmask is not None:
            return set()
        banned = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            banned |= self.eos_token_ids
        return banned


def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator | None:
    """A generator for sample `index` of a request seeded with `seed` (None when unseeded)."""
    if seed is None:
        return None
    # Hash (seed, index) so the n samples of one request differ and nearby seeds are unrelated.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[tuple[int, TokenLogprob | None]]:
    """Choose one token per row of `logits` [B, V]; with a TokenLogprob where the row asks for logprobs."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(rows)} rows")
    if all(_is_plain_greedy(row) for row in rows):
        return [(token, None) for token in first_argmax(logits).tolist()]

    processed = _processed(logits, rows)
    tokens = _choose_tokens(processed, rows)
    logprobs = _sampled_logprobs(processed, tokens, rows)
    return list(zip(tokens.tolist(), logprobs, strict=True))


def verify_drafts(logits: torch.Tensor, rows: list[SamplingRow], drafts: list[int]) -> list[tuple[int, TokenLogprob | None]]:
    """Tokens for one sequence's speculative step: logits [k + 1, V], row j following drafts[:j].

    Greedy: every row's argmax (the caller keeps them up to the first that differs from its draft).
    Random (unseeded): the speculative sampling rule for a proposal that is one token: draft j is kept
    with probability p_j(draft), else the token is drawn from p_j without the draft, renormalized, and
    the step ends there; after k kept drafts one more token is drawn from p_k. Each token so chosen has
    exactly the distribution plain sampling would draw it from.
    """
    if logits.shape[0] != len(rows) or len(rows) != len(drafts) + 1:
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sampling rows and {len(drafts)} drafts")
    if rows[0].is_greedy:
        return sample(logits, rows)
    processed = _processed(logits, rows)
    probs = _truncated_probs(processed, rows)
    probs /= probs.sum(dim=-1, keepdim=True)
    chosen: list[int] = []
    for j, draft in enumerate(drafts):
        if torch.rand((), device=probs.device) < probs[j, draft]:
            chosen.append(draft)
            continue
        rest = probs[j].clone()
        rest[draft] = 0.0
        chosen.append(_categorical(rest))
        break
    else:
        chosen.append(_categorical(probs[-1]))
    count = len(chosen)
    tokens = torch.tensor(chosen, device=processed.device)
    return list(zip(chosen, _sampled_logprobs(processed[:count], tokens, rows[:count]), strict=True))


def _categorical(weights: torch.Tensor) -> int:
    """One draw from unnormalized weights [V] (unseeded: the default generator)."""
    return int(_inverse_cdf(weights.unsqueeze(0), torch.rand(1, device=weights.device))[0])


def _processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """fp32 logits after steps 0-3: grammar, logit bias, min_tokens, penalties (a copy where any applies)."""
    processed = logits.float()
    if not any(row.token_bitmask is not None or row.params.logit_bias or row.has_penalties
               or row.banned_by_min_tokens() for row in rows):
        return processed  # nothing to change: read-only from here on, so no copy (a 12 MB one at batch 64)
    processed = processed.clone()
    _apply_grammar(processed, rows)
    _apply_logit_bias(processed, rows)
    _apply_min_tokens(processed, rows)
    penalized = [i for i, row in enumerate(rows) if row.has_penalties]
    if penalized:
        index = torch.tensor(penalized, device=processed.device)
        processed[index] = apply_penalties(processed[index], [rows[i] for i in penalized])
    return processed


def first_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis, first index on ties. Same result as Tensor.argmax, but torch's CPU
    max-with-indices is ~2.5x faster: 3 ms a step at batch 64 x 49k vocab before."""
    return x.max(dim=-1).indices


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[TokenLogprob]:
    """Logprob, rank and top-k of each next_ids[t] under logits[t] ([T, V], raw model output)."""
    if logits.dim() != 2 or logits.shape[0] != len(next_ids):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(next_ids)} next ids")
    if not next_ids:
        return []
    ids = torch.tensor(next_ids, device=logits.device)
    entries: list[TokenLogprob] = []
    # In chunks: a float32 log-softmax over a long prompt and a large vocabulary is hundreds of MB.
    for start in range(0, len(next_ids), _PROMPT_LOGPROBS_CHUNK):
        chunk = slice(start, start + _PROMPT_LOGPROBS_CHUNK)
        entries += _logprob_entries(logits[chunk].float().log_softmax(dim=-1), ids[chunk],
                                    [k] * len(next_ids[chunk]))
    return entries


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt + output), then frequency and presence (output) penalties; returns a new tensor."""
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = _token_counts([row.output_token_ids for row in rows], vocab, device)
    seen = _token_counts([row.prompt_token_ids for row in rows], vocab, device) > 0
    seen |= output_counts > 0

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)

    repetition = column([row.params.repetition_penalty for row in rows])
    frequency = column([row.params.frequency_penalty for row in rows])
    presence = column([row.params.presence_penalty for row in rows])
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep tokens whose logit is >= the k-th largest of their row (one k per row; 0 or > V: keep all)."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k <= vocab else vocab for k in top_k]
    # topk to the largest k rather than a full sort; the k's are host values, so no device sync.
    largest = logits.topk(max(ks), dim=-1).values
    kth = largest.gather(1, torch.tensor(ks, device=logits.device).unsqueeze(1) - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities first sum to >= p (one p per row; 1: keep all)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < _top_p_cutoff(probs, top_p), float("-inf"))


def _top_p_cutoff(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """[B, 1] the smallest probability top-p keeps in each row of normalized `probs` (0 where p = 1)."""
    p = torch.tensor(top_p, device=probs.device).unsqueeze(1)
    vocab = probs.shape[-1]
    # Sorting the whole vocabulary is slow; look at the best `width` tokens, widening until every row's
    # running sum reaches its p there (it usually does early). Same result as a full sort.
    width = min(vocab, _TOP_P_FIRST_WIDTH)
    while True:
        best = probs.topk(width, dim=-1).values
        cumulative = best.cumsum(dim=-1)
        if width == vocab or bool(((cumulative[:, -1:] >= p) | (p >= 1.0)).all()):
            break
        width = min(vocab, width * 8)
    # Index of the first token at which the running sum reaches p: the smallest kept probability.
    last = (cumulative < p).sum(dim=-1).clamp(max=width - 1)
    cutoff = best.gather(1, last.unsqueeze(1))
    # A float32 running sum may stop short of 1.0; p = 1 must keep everything.
    return torch.where(p >= 1.0, 0.0, cutoff)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p times the row's largest probability (one per row)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < _min_p_threshold(probs, min_p), float("-inf"))


def _min_p_threshold(weights: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """[B, 1] min_p times each row's largest weight: the same cut on probabilities normalized or not."""
    return weights.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=weights.device).unsqueeze(1)


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (row.is_greedy and row.token_bitmask is None and not p.logit_bias and not row.has_penalties and p.logprobs is None
            and not row.banned_by_min_tokens())


def _apply_grammar(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    guided = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
    if not guided:
        return
    packed = torch.stack([rows[i].token_bitmask for i in guided]).to(logits.device, non_blocking=True)
    bias = bitmask_to_bias(packed, logits.shape[-1])
    logits.index_add_(0, torch.tensor(guided, device=logits.device), bias)


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    # Ids outside the vocabulary are skipped: the engine rejects them on arrival, and an out-of-range
    # index here would kill the whole batch (a device-side assert on CUDA).
    entries = [(i, int(token), bias) for i, row in enumerate(rows)
               for token, bias in row.params.logit_bias.items() if 0 <= int(token) < vocab]
    if entries:
        row_ids, token_ids, biases = zip(*entries, strict=True)
        _put(logits, row_ids, token_ids, torch.tensor(biases, dtype=logits.dtype, device=logits.device),
             accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    vocab = logits.shape[-1]
    entries = [(i, token) for i, row in enumerate(rows) for token in row.banned_by_min_tokens()
               if 0 <= token < vocab]
    if entries:
        row_ids, token_ids = zip(*entries, strict=True)
        _put(logits, row_ids, token_ids, torch.tensor(float("-inf"), device=logits.device))


def _put(logits: torch.Tensor, row_ids: Sequence[int], token_ids: Sequence[int], values: torch.Tensor,
         accumulate: bool = False) -> None:
    index = (torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device))
    logits.index_put_(index, values, accumulate=accumulate)


def _token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(id_lists), vocab] float counts of each id per list."""
    width = max((len(ids) for ids in id_lists), default=0)
    # Pad with an extra column `vocab` that is dropped after counting.
    padded = torch.tensor([ids + [vocab] * (width - len(ids)) for ids in id_lists], dtype=torch.long,
                          device=device).reshape(len(id_lists), width)
    counts = torch.zeros(len(id_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _choose_tokens(processed: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[B] chosen ids: argmax for greedy rows, a draw from the truncated distribution for the others."""
    random = [i for i, row in enumerate(rows) if not row.is_greedy]
    if len(random) == len(rows):  # no greedy row: no argmax, and no copy of the random rows
        return _draw(processed, rows)
    tokens = first_argmax(processed)
    if random:
        index = torch.tensor(random, device=processed.device)
        tokens[index] = _draw(processed[index], [rows[i] for i in random])
    return tokens


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[B] ids drawn after temperature and the truncation masks (all rows random)."""
    return _inverse_cdf(_truncated_probs(logits, rows), _uniforms(rows, logits.device))


def _truncated_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Probabilities after temperature, then the top-k, top-p and min-p masks (all rows random).

    Masked tokens are 0 and the rest are not renormalized (the draw does not need it): the masks work in
    probability space, so the softmax is taken once, and top-p, the one cut that needs normalized
    probabilities, comes right after it. min-p's cut is relative to the row's largest probability, which
    top-p always keeps, so it is the same on the renormalized distribution.
    """
    params = [row.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = _on_rows(logits / temperature.unsqueeze(1), apply_top_k, [p.top_k for p in params],
                      [p.top_k > 0 for p in params])
    probs = logits.softmax(dim=-1)
    if any(p.top_p < 1.0 for p in params):  # p = 1 rows get cutoff 0: nothing masked
        probs.masked_fill_(probs < _top_p_cutoff(probs, [p.top_p for p in params]), 0.0)
    if any(p.min_p > 0.0 for p in params):  # min_p = 0 rows get threshold 0: nothing masked
        probs.masked_fill_(probs < _min_p_threshold(probs, [p.min_p for p in params]), 0.0)
    return probs


def _on_rows(logits: torch.Tensor, mask: Callable[[torch.Tensor, list], torch.Tensor], values: list,
             active: list[bool]) -> torch.Tensor:
    """Apply a truncation mask to the rows that use it only."""
    if all(active):
        return mask(logits, values)
    if any(active):
        chosen = [i for i, on in enumerate(active) if on]
        index = torch.tensor(chosen, device=logits.device)
        logits[index] = mask(logits[index], [values[i] for i in chosen])
    return logits


def _uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """[B] uniforms in [0, 1), one per sampling row: seeded rows draw from their own generator."""
    uniforms = torch.rand(len(rows), device=device)  # unseeded rows share the default generator
    for i, row in enumerate(rows):
        if row.generator is not None:
            uniforms[i] = torch.rand(1, generator=row.generator, device=row.generator.device).to(device)[0]
    return uniforms


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[B] ids: per row, the first token whose running sum of weights [B, V] passes uniform * the row's total.

    Zero-weight (masked) tokens add nothing to the running sum, so they are never the first to pass it.
    """
    cumulative = weights.cumsum(dim=-1)
    targets = (uniforms * cumulative[:, -1]).unsqueeze(1)
    return torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp_(max=weights.shape[-1] - 1)


def _sampled_logprobs(processed: torch.Tensor, tokens: torch.Tensor,
                      rows: list[SamplingRow]) -> list[TokenLogprob | None]:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return [None] * len(rows)
    index = torch.tensor(wanted, device=processed.device)
    entries = _logprob_entries(processed[index].log_softmax(dim=-1), tokens[index],
                               [rows[i].params.logprobs for i in wanted])
    result: list[TokenLogprob | None] = [None] * len(rows)
    for i, entry in zip(wanted, entries, strict=True):
        result[i] = entry
    return result


def _logprob_entries(logprobs: torch.Tensor, ids: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """TokenLogprob of ids[n] under logprobs[n] ([N, V]) with the ks[n] best alternatives."""
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(min(max(ks), logprobs.shape[-1]), dim=-1)
    chosen_l, ranks_l, values_l, top_ids_l, ids_l = (
        t.tolist() for t in (chosen, ranks, top_values, top_ids, ids))
    entries = []
    for n, k in enumerate(ks):
        # Masked tokens (-inf) are left out: they are not alternatives, and -inf is not valid JSON.
        top = [(t, v) for t, v in zip(top_ids_l[n][:k], values_l[n][:k], strict=True) if v != float("-inf")]
        entries.append(TokenLogprob(ids_l[n], chosen_l[n], ranks_l[n], top))
    return entries
