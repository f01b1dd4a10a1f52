"""One-row decode steps replayed as recorded kernel calls (engine/decode_graph.py) against the modules' steps."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers.tiny_engine import make_tiny_model_dir
from test_engine import make_engine

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.decode_graph import DecodeGraph, _recording_kernel_calls
from engine.models.layers import silu_and_mul
from engine.models.q8_matmul import q8_kernel_runs
from engine.models.w4a16_matmul import w4a16_kind

# Where kvserve's integer kernels run (AVX-512 VNNI), SmolLM2's default step is kernel calls only.
INTEGER_KERNELS = w4a16_kind() is not None and q8_kernel_runs()


@pytest.fixture(scope="module")
def engine(smollm2_gguf_path: Path) -> LLMEngine:
    return LLMEngine(str(smollm2_gguf_path), EngineConfig(speculative=None, max_model_len=512), progress=False)


def generate(engine: LLMEngine, prompts: list[list[int]], tag: str) -> list[tuple[list[int], list]]:
    """Greedy continuations with the top-3 logprobs of every token, one request at a time."""
    results = []
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}{i}", ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3))
        final = None
        while engine.has_unfinished():
            for output in engine.step():
                final = output
        results.append((final.outputs[0].token_ids, final.outputs[0].logprobs))
    return results


def test_captured_where_the_step_is_kernel_calls_only(engine: LLMEngine) -> None:
    graph = engine.runner.decode_graph
    assert (graph is not None) == INTEGER_KERNELS
    if graph is not None:  # every layer's ~11 calls and the LM head's
        assert len(graph.calls) > 10 * engine.model_config.num_layers


@pytest.mark.skipif(not INTEGER_KERNELS, reason="no AVX-512 VNNI here: the step runs PyTorch ops, nothing is captured")
def test_replayed_steps_give_the_modules_tokens_and_logprobs(engine: LLMEngine, monkeypatch) -> None:
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    # Prompts of 3 to 70 tokens, so decodes cross block boundaries (16) at different points. A first pass fills
    # the prefix cache, so both compared passes find the same cached blocks (a cached prompt's last token is
    # computed as a one-row step, which the graph replays too).
    prompts = [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in (3, 15, 16, 33, 70)]
    generate(engine, prompts, "warm")
    replays = []
    replay = DecodeGraph.replay
    monkeypatch.setattr(DecodeGraph, "replay", lambda self, *a: replays.append(1) or replay(self, *a))
    recorded = generate(engine, prompts, "graph")
    assert len(replays) >= 39 * len(prompts)  # every decode step
    graph, engine.runner.decode_graph = engine.runner.decode_graph, None
    try:
        modules = generate(engine, prompts, "modules")
    finally:
        engine.runner.decode_graph = graph
    assert recorded == modules


def test_a_step_with_pytorch_ops_is_not_captured(tmp_path) -> None:
    engine = make_engine(make_tiny_model_dir(tmp_path), quantization="none")  # fp32 matmuls: PyTorch's
    assert engine.runner.decode_graph is None
    graph, why_not = DecodeGraph.capture(engine.model, max_blocks=4)
    assert graph is None and "PyTorch ops" in why_not
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()


def test_only_the_capturing_threads_calls_are_recorded() -> None:
    gate_up = torch.randn(1, 64)
    silu_and_mul(gate_up)  # the kernel's function made before the recording hooks it
    started, stop = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.set()
        while not stop.is_set():
            silu_and_mul(gate_up)

    worker = threading.Thread(target=other_thread)
    worker.start()
    started.wait()
    try:
        with _recording_kernel_calls() as calls:
            for _ in range(3):
                silu_and_mul(gate_up)
    finally:
        stop.set()
        worker.join()
    assert [function.__name__ for function, _ in calls] == ["kvserve_silu_mul_f32"] * 3
