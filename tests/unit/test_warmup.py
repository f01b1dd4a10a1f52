"""The warm-up before serving: prefill and decode at batch sizes 1 and 4, and no trace afterwards."""

from __future__ import annotations

import pytest
from helpers.tiny_engine import make_tiny_model_dir

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.warmup import warm_up


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def engine_for(tiny_dir: str, **config: object) -> LLMEngine:
    return LLMEngine(tiny_dir, EngineConfig(device="cpu", dtype="float32", kv_cache_bytes=4 << 20, **config),
                     progress=False)


def greedy(engine: LLMEngine, prompt: str) -> list[int]:
    engine.add_request("probe", prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    done = None
    while engine.has_unfinished():
        for out in engine.step():
            done = out
    return done.outputs[0].token_ids


def test_warm_up_prefills_and_decodes_a_greedy_and_a_sampled_request_together(tiny_dir: str) -> None:
    engine = engine_for(tiny_dir)
    steps: list[tuple[int, int, set[bool]]] = []  # (prefilling, decoding, which are greedy) per forward pass
    execute = engine.runner.execute

    def spy(batch):
        decodes = sum(1 for item in batch.scheduled if item.seq.num_computed_tokens >= item.seq.num_prompt_tokens)
        greedy_flags = {item.seq.params.temperature == 0.0 for item in batch.scheduled}
        steps.append((len(batch.scheduled) - decodes, decodes, greedy_flags))
        return execute(batch)

    engine.runner.execute = spy
    assert warm_up(engine) > 0
    assert (2, 0, {True, False}) in steps
    assert (0, 2, {True, False}) in steps


def test_warm_up_leaves_no_trace(tiny_dir: str) -> None:
    cold = engine_for(tiny_dir)
    warm = engine_for(tiny_dir)
    warm_up(warm)
    stats = warm.stats()
    assert (stats.num_steps, stats.prompt_tokens, stats.generation_tokens, stats.prefix_cache_queries,
            stats.num_preemptions, stats.num_kv_blocks_used, stats.num_running, stats.num_waiting) == (0,) * 8
    assert not warm.has_unfinished()
    assert greedy(warm, "Hello world") == greedy(cold, "Hello world")


def test_warm_up_fits_a_small_engine(tiny_dir: str) -> None:
    engine = engine_for(tiny_dir, max_num_seqs=1, max_num_batched_tokens=8, max_model_len=12)
    warm_up(engine)  # batch 2 capped at 1, prompts cut to the context
    assert engine.stats().num_kv_blocks_used == 0
