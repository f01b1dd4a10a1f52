"""Decode steps replayed as recorded kernel calls (engine/decode_graph.py) against the modules' steps, and the arena
the recorded steps share."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers.tiny_engine import make_tiny_model_dir
from test_engine import make_engine

from engine import EngineConfig, LLMEngine, SamplingParams, native
from engine.decode_graph import Arena, DecodeGraph
from engine.models.layers import silu_and_mul
from engine.models.q8_matmul import q8_kernel_runs
from engine.models.w4a16_matmul import w4a16_kind

# Where kvserve's integer kernels run (AVX-512 VNNI or AVX2), SmolLM2's default step is kernel calls only.
INTEGER_KERNELS = w4a16_kind() is not None and q8_kernel_runs()


@pytest.fixture(scope="module")
def engine(smollm2_gguf_path: Path) -> LLMEngine:
    return LLMEngine(str(smollm2_gguf_path), EngineConfig(speculative=None, max_model_len=512), progress=False)


def generate(engine: LLMEngine, prompts: list[list[int]], tag: str, together: int = 1) -> list[tuple[list[int], list]]:
    """Greedy continuations with the top-3 logprobs of every token, `together` requests at a time."""
    finals = {}
    for first in range(0, len(prompts), together):
        for i in range(first, min(first + together, len(prompts))):
            params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
            engine.add_request(f"{tag}{i}", prompts[i], params)
        while engine.has_unfinished():
            for output in engine.step():
                finals[output.request_id] = output
    return [(finals[f"{tag}{i}"].outputs[0].token_ids, finals[f"{tag}{i}"].outputs[0].logprobs)
            for i in range(len(prompts))]


def compare_with_the_modules(engine: LLMEngine, prompts: list[list[int]], monkeypatch, together: int = 1) -> list[int]:
    """Asserts the same tokens and logprobs with the graphs as without; returns the rows of each replayed step."""
    generate(engine, prompts, "warm", together)  # fills the prefix cache, so both passes below find the same blocks
    rows = []
    replay = DecodeGraph.replay
    monkeypatch.setattr(DecodeGraph, "replay", lambda self, hidden, *a: rows.append(len(hidden)) or replay(self, hidden, *a))
    recorded = generate(engine, prompts, "graph", together)
    engine.runner.records_decode_steps = False
    try:
        modules = generate(engine, prompts, "modules", together)
    finally:
        engine.runner.records_decode_steps = True
    assert recorded == modules
    return rows


def random_prompts(engine: LLMEngine, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(len(lengths))
    return [torch.randint(2, engine.model_config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def test_recorded_where_the_step_is_kernel_calls_only(engine: LLMEngine) -> None:
    generate(engine, [[5, 6, 7]], "first")
    graph = engine.runner.decode_graphs[1]  # recorded at the first one-row decode step, or found not recordable
    assert (graph is not None) == INTEGER_KERNELS
    if graph is not None:  # every layer's ~11 calls and the LM head's
        assert len(graph.calls) > 10 * engine.model_config.num_layers


NO_GRAPHS = pytest.mark.skipif(not INTEGER_KERNELS, reason="no integer kernels: the step runs PyTorch ops, none captured")


@NO_GRAPHS
def test_one_row_steps_give_the_modules_tokens_and_logprobs(engine: LLMEngine, monkeypatch) -> None:
    # Prompts of 3 to 70 tokens, so decodes cross block boundaries (16) at different points.
    prompts = random_prompts(engine, (3, 15, 16, 33, 70))
    rows = compare_with_the_modules(engine, prompts, monkeypatch)
    assert rows.count(1) >= 39 * len(prompts)  # every decode step


@NO_GRAPHS
def test_steps_of_two_to_four_sequences_give_the_modules_tokens_and_logprobs(engine: LLMEngine, monkeypatch) -> None:
    prompts = random_prompts(engine, (5, 17, 40, 9, 31, 64, 2))
    rows = compare_with_the_modules(engine, prompts, monkeypatch, together=4)
    assert {3, 4} <= set(rows)  # 4 together, then the last 3
    rows = compare_with_the_modules(engine, prompts[:2], monkeypatch, together=2)
    assert 2 in rows


@NO_GRAPHS
def test_steps_of_many_sequences_give_the_modules_tokens_and_logprobs_and_share_one_arena_and_inputs(
        engine: LLMEngine, monkeypatch) -> None:
    prompts = random_prompts(engine, (5, 17, 40, 9, 31, 64, 2, 23, 11, 50, 3, 19))
    assert 12 in compare_with_the_modules(engine, prompts, monkeypatch, together=12)
    assert 7 in compare_with_the_modules(engine, prompts[:7], monkeypatch, together=7)
    graphs = [graph for graph in engine.runner.decode_graphs.values() if graph is not None]
    assert len(graphs) >= 2
    arena = engine.runner.graph_arena
    start, end = arena.buffer.ctypes.data, arena.buffer.ctypes.data + arena.buffer.size
    inputs = engine.runner.graph_inputs
    # every graph's outputs, its logits among them, lie in the one arena; every graph reads one set of inputs
    for graph in graphs:
        assert start <= graph.logits.data_ptr() < end and graph.keep_alive == [inputs, arena]
        assert graph.block_tables.data_ptr() == inputs.block_tables.data_ptr() and len(graph.hidden) <= inputs.capacity
    # Within a step the arena hands out again what the modules freed: it holds a few of the step's outputs (the
    # logits and a layer's), not all of them. Grown for 12 rows, it is still smaller than all of a 7-row step's.
    assert arena.wanted <= arena.taken / 4 and arena.buffer.size < arena.taken


@NO_GRAPHS
def test_speculative_verify_steps_give_the_modules_tokens_and_logprobs(smollm2_gguf_path: Path, monkeypatch) -> None:
    engine = LLMEngine(str(smollm2_gguf_path), EngineConfig(max_model_len=512), progress=False)  # speculation on
    phrase = random_prompts(engine, (12,))[0]
    prompts = [phrase * 3, [7] + phrase * 2]  # repeats: the n-gram drafts are often kept
    rows = compare_with_the_modules(engine, prompts, monkeypatch, together=2)
    assert engine.stats().spec_accepted_tokens > 0 and max(rows) > 2  # verify rows were replayed


def test_a_step_with_pytorch_ops_is_not_recorded_and_runs_the_modules(tmp_path) -> None:
    engine = make_engine(make_tiny_model_dir(tmp_path), quantization="none")  # fp32 matmuls: PyTorch's
    plain = generate(engine, [[5, 6, 7]], "a")
    assert 1 in engine.runner.decode_graphs and set(engine.runner.decode_graphs.values()) == {None}
    assert generate(engine, [[5, 6, 7]], "b") == plain  # the first step (the refused recording's) was right too
    engine.runner.records_decode_steps = False
    assert generate(engine, [[5, 6, 7]], "c") == plain


def offsets(arena: Arena, *tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() - arena.buffer.ctypes.data for t in tensors]


def test_the_arena_hands_out_aligned_outputs_until_it_is_outgrown() -> None:
    arena = Arena(1024)
    first, second = arena.take((3, 5), torch.float32), arena.take((2,), torch.int64)  # 60 bytes, then 16
    assert offsets(arena, first, second) == [0, 64] and arena.buffer.ctypes.data % 64 == 0
    assert (first.shape, second.dtype, arena.outgrown) == ((3, 5), torch.int64, False)
    assert arena.take((1000,), torch.float32) is None and arena.outgrown and arena.wanted == 128 + 4032  # runs of whole cache lines


def test_the_arena_reuses_what_a_step_frees_once_no_view_of_it_is_left() -> None:
    arena = Arena(4096)
    first, second = arena.take((32,), torch.float32), arena.take((16,), torch.float32)  # 128 bytes at 0, 64 at 128
    first_rows = first.view(4, 8)
    del first
    assert offsets(arena, third := arena.take((8,), torch.float32)) == [192]  # a view still holds the first
    del first_rows
    assert offsets(arena, arena.take((16,), torch.float32)) == [0]  # freed (and this one is freed at once)
    del second, third  # both runs merge with the free one at 0: one run of 256 bytes from the start
    assert offsets(arena, whole := arena.take((64,), torch.float32)) == [0] and arena.wanted == 256
    arena.start_capture()  # a new capture: everything is free, and frees of the last capture's outputs are ignored
    again = arena.take((64,), torch.float32)
    del whole
    assert offsets(arena, again, arena.take((1,), torch.float32)) == [0, 256]


def test_only_the_recording_threads_calls_are_recorded() -> None:
    gate_up = torch.randn(1, 64)
    started, stop = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.set()
        while not stop.is_set():
            silu_and_mul(gate_up)

    worker = threading.Thread(target=other_thread)
    worker.start()
    started.wait()
    try:
        with native.recording_calls() as calls:
            for _ in range(3):
                silu_and_mul(gate_up)
    finally:
        stop.set()
        worker.join()
    assert [function.__name__ for function, _ in calls] == ["kvserve_silu_mul_f32"] * 3
