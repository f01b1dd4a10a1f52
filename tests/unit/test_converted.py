"""The converted-model cache: a second start from the same GGUF skips the GGUF and behaves identically."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.converted import converted_dir
from engine.models.q8_matmul import q8_kernel_runs

pytestmark = pytest.mark.slow


def _greedy(engine: LLMEngine, prompt: str) -> list[int]:
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=2))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    return final.outputs[0].token_ids, [lp.logprob for lp in final.outputs[0].logprobs]


def test_second_start_loads_the_converted_copy(smollm2_gguf_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVSERVE_HOME", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    shutil.copy(smollm2_gguf_path, gguf)
    options = EngineConfig(device="cpu", dtype="float32", max_num_seqs=2, max_model_len=256)
    cache = converted_dir(str(gguf), torch.float32)
    older_format = cache.with_name(cache.name.rpartition("-v")[0] + "-v0")
    older_format.mkdir(parents=True)
    first = LLMEngine(str(gguf), options, progress=False)
    assert (cache / "complete").is_file()
    assert not older_format.exists()  # replaced, not left to fill the disk

    import engine.gguf_loader as gguf_loader
    import engine.models.cpu_matmul as cpu_matmul

    def no_gguf(*args, **kwargs):
        raise AssertionError("the second start must not read the GGUF")

    searched = []

    def recorded_search(weight):
        searched.append(weight)
        return find_grid(weight)

    def no_head_search(weight):
        raise AssertionError("the second start must take the LM head's 8-bit grid from the copy")

    monkeypatch.setattr(gguf_loader, "open_gguf", no_gguf)
    find_grid = cpu_matmul.four_bit_groups
    monkeypatch.setattr(cpu_matmul, "four_bit_groups", recorded_search)
    monkeypatch.setattr(cpu_matmul, "eight_bit_groups", no_head_search)
    second = LLMEngine(str(gguf), options, progress=False)
    assert second.quantization == first.quantization
    # SmolLM2's Q8_0 LM head keeps its codes where kvserve's 8-bit kernel runs (engine/models/q8_matmul.py)
    assert ("q8_0" in second.quantization) == q8_kernel_runs()
    assert second.model.lm_head_grid is None  # packed, not kept twice
    # The layers' grids came from the copy; only the LM head (not a Linear, and not 4-bit here) is looked at.
    assert [w.shape for w in searched] in ([], [second.model.lm_head_weight.shape])
    assert all(m.four_bit_grid is None for m in second.model.modules() if hasattr(m, "four_bit_grid"))  # freed

    text = "<|im_start|>user\nWhat is a llama? 🦙<|im_end|>\n"
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert second.model_config == first.model_config
    ids_a, lps_a = _greedy(first, "The capital of France is")
    ids_b, lps_b = _greedy(second, "The capital of France is")
    assert ids_a == ids_b
    assert lps_a == pytest.approx(lps_b, abs=1e-5)


def test_a_changed_file_gets_a_new_copy(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVSERVE_HOME", str(tmp_path))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF one")
    before = converted_dir(str(path), torch.float32)
    path.write_bytes(b"GGUF two, longer")
    assert converted_dir(str(path), torch.float32) != before
