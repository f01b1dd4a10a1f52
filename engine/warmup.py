"""Warm-up: a few short requests through the engine before it serves, so that no client's request pays for
what only the first steps do (allocator growth, oneDNN/fbgemm primitive creation, CUDA kernel selection,
the OpenMP thread team's start). Run it on the thread that will step the engine; it leaves no trace."""

from __future__ import annotations

import random
import time

from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

# One batch of two, one request greedy and one sampled: the first request after it is no faster for a batch of
# 4 as well (that took 0.13 s more of a 2.1 s start; on a 2-core CPU a warm-up saves the first request ~20 ms).
BATCH_SIZES = (2,)  # capped at max_num_seqs
# As short as still covers each path: a full KV block and a partial one (block_size 16), and one decode step
# after the prefill's token (24 prompt and 4 new tokens took 0.3 s of a 2.2 s start).
PROMPT_TOKENS = 17
NEW_TOKENS = 2


def warm_up(engine: LLMEngine, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> float:
    """Prefill and decode at each batch size, greedy and seeded sampling, then reset the engine's counters.
    Returns the seconds it took."""
    start = time.perf_counter()
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)
    prompt_len = max(1, min(PROMPT_TOKENS, engine.max_model_len - NEW_TOKENS - 1))
    new_tokens = max(1, min(NEW_TOKENS, engine.max_model_len - prompt_len))
    rng = random.Random(0)
    for size in sorted({min(b, engine.config.max_num_seqs) for b in batch_sizes}):
        for i in range(size):
            # Distinct prompts (no prefix-cache shortcut), half greedy and half sampled with a seed (the global
            # RNG, which unseeded requests use, is left alone).
            prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0 if i % 2 == 0 else 1.0,
                                    seed=i, top_p=1.0 if i % 2 == 0 else 0.9)
            engine.add_request(f"warmup-{size}-{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()
    engine.reset_stats()
    return time.perf_counter() - start
