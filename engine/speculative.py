"""N-gram (prompt lookup) speculative decoding: draft tokens copied from earlier in the sequence.

A decode step at batch 1 on a CPU costs about the same for a few query rows as for one (the weights are
read once either way), so when the text is likely to repeat something already in the context (a code
edit, a summary quoting its source, a JSON echo), the engine guesses the next tokens by finding the last
few tokens earlier in the sequence and copying what followed them, then checks all the guesses in one
forward pass: row j's logits are computed exactly as a plain decode step would compute them (see the
runner: every verify row is laid out as a decode row of its own), and the longest run of guesses the
model itself would have chosen is kept, plus the model's own token after it. Greedy output is therefore
token for token the same as without speculation, wherever attention is batch-invariant (the README's known
gap: PyTorch's CPU flash attention is not, for SmolLM2's head shape at 2 threads).

Sampled requests speculate too, unless seeded: a draft is kept with the probability the model gives it
and a rejected one is replaced by a draw from the rest of the distribution (speculative sampling), so
tokens follow the distribution plain sampling draws from, though not the same tokens for a given seed.

On by default (EngineConfig.speculative; None, or `kvserve serve --speculative-config off`, turns it off),
configured as vLLM's `speculative_config` {"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_max": n, "prompt_lookup_min": m}. Requests with a grammar do not speculate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from engine.sampling_params import SamplingParams

_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size")
_DEFAULT_LOOKUP_MIN = 2


@dataclass(frozen=True, slots=True)
class NgramConfig:
    # Most draft tokens checked in one step; None: chosen at load for the kernels the model runs on
    # (for_kernels). sequence_draft_limit narrows it.
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int = 4  # longest n-gram looked up (tried first)
    prompt_lookup_min: int = _DEFAULT_LOOKUP_MIN  # shortest n-gram looked up
    # Speculate only while at most this many sequences run: beyond, a step is compute-bound and extra rows cost
    # what kept drafts save. With 4 streams of the bench.speculative tasks, 4 measured 0.82x of no speculation
    # and 2 1.01x (README: Speculative decoding, several streams).
    disable_by_batch_size: int = 2

    def __post_init__(self) -> None:
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1, got {self.disable_by_batch_size}")

    @classmethod
    def parse(cls, value: str | dict) -> NgramConfig:
        """From vLLM's speculative_config (a dict, or its JSON text); ValueError names what is wrong."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
        if value.get("method", "ngram") != "ngram":
            raise ValueError(f"speculative_config: method {value['method']!r} is not supported; only 'ngram' is "
                             "(prompt lookup, no draft model)")
        options = {key: item for key, item in value.items() if key != "method"}
        if not all(isinstance(item, int) and not isinstance(item, bool) for item in options.values()):
            raise ValueError("speculative_config: every value but method must be an integer")
        if "prompt_lookup_max" in options and "prompt_lookup_min" not in options:
            options["prompt_lookup_min"] = min(_DEFAULT_LOOKUP_MIN, options["prompt_lookup_max"])
        return cls(**options)


# Drafts where extra rows are cheap: a step of 4 rows costs ~1.3x one on the VNNI and AMX integer kernels, and more
# drafts are kept less often (measured on Zen 4; bench.speculative).
CHEAP_ROWS_DRAFTS = 3
# Where each row costs nearly its own arithmetic (the AVX2 build of the integer kernels: a step of 4 rows ~2.4x
# one, 2 rows ~1.2x), one draft measured best at 1 and 2 running sequences (README: Speculative decoding).
COSTLY_ROWS_DRAFTS = 1


def for_kernels(config: NgramConfig, rows_cost_arithmetic: bool) -> NgramConfig:
    """`config` with num_speculative_tokens, where unset, chosen for the kernels the model runs on:
    `rows_cost_arithmetic` where a decode step is bound by arithmetic from 2 rows
    (engine.models.cpu_matmul.rows_cost_arithmetic)."""
    if config.num_speculative_tokens is not None:
        return config
    return replace(config, num_speculative_tokens=COSTLY_ROWS_DRAFTS if rows_cost_arithmetic else CHEAP_ROWS_DRAFTS)


# Rows a step may spend on speculating sequences: each gets min(num_speculative_tokens, this // running - 1)
# drafts (at least 1), so 1 running sequence checks up to 5, 2 check 2 each, 3 or more 1 each. With 2 streams
# on the VNNI kernels, 2 drafts each measured 1.15x 3 each (README: Speculative decoding, several streams).
_ROWS_BUDGET = 6


def draft_limit(config: NgramConfig, num_running: int) -> int:
    """Most drafts one sequence checks in a step while `num_running` sequences run (0: no speculation)."""
    if not 0 < num_running <= config.disable_by_batch_size:
        return 0
    return min(config.num_speculative_tokens, max(1, _ROWS_BUDGET // num_running - 1))


# A step checking k drafts costs more than a plain one, ~1.1x for k = 1 and ~1.5x for k = 3 at batch 1 on the
# integer kernels (2-core Zen 4: from 4 rows the matmuls are bound by arithmetic, not by reading the weights), so
# 3 drafts pay only where about half a draft a step is kept. A sequence whose record is below that checks one
# draft a step, which still pays from ~1 kept in 10 and keeps its record up to date.
_KEPT_PER_STEP_FOR_FULL_DRAFTS = 0.5


def sequence_draft_limit(limit: int, draft_steps: int, kept: int) -> int:
    """`limit` (draft_limit's), or 1 for a sequence that kept fewer than ~0.5 drafts a step so far (its first
    draft step counts as if it kept one: new sequences start trusted)."""
    if limit <= 1 or kept + 1 >= _KEPT_PER_STEP_FOR_FULL_DRAFTS * (draft_steps + 1):
        return limit
    return 1


def speculates(params: SamplingParams) -> bool:
    """Whether a request's tokens can be checked several at a time with the same result: greedy or unseeded
    sampling (a seed promises the tokens of plain sampling, which speculative sampling draws differently),
    and no grammar (its state would have to follow every draft)."""
    return (params.greedy or params.seed is None) and params.structured_output is None


def propose(token_ids: list[int], config: NgramConfig, limit: int) -> list[int]:
    """Up to `limit` tokens that followed the most recent earlier occurrence of the sequence's last n tokens.

    Longer n-grams are tried first (a longer match predicts better); among occurrences, the latest wins.
    """
    limit = min(limit, config.num_speculative_tokens)
    length = len(token_ids)
    if limit < 1:
        return []
    last = token_ids[-1]
    # Where the last token occurred before (latest first): every n-gram match ends at one of these.
    ends = [i for i in range(length - 2, -1, -1) if token_ids[i] == last]
    for n in range(min(config.prompt_lookup_max, length - 1), config.prompt_lookup_min - 1, -1):
        tail = token_ids[length - n:]
        for end in ends:
            if end + 1 >= n and token_ids[end + 1 - n:end + 1] == tail:
                return token_ids[end + 1:end + 1 + limit]
    return []
