"""Llama, Qwen2 and GPT-2 loaded from HF safetensors dirs: logits equal transformers', with and without the cache."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import hf_logits, save_hf, tiny_gpt2, tiny_llama, tiny_qwen2
from safetensors.torch import load_file, save_file

from engine.runner import ModelRunner
from engine.weights import load_model

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama-gqa": tiny_llama,
    "llama-tied": lambda: tiny_llama(tie=True),
    "llama3-rope": lambda: tiny_llama(llama3_rope=True),
    "qwen2-bias": tiny_qwen2,
    "gpt2": tiny_gpt2,
}
PROMPT = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def kvserve_logits(path: str, ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
    model, cfg = load_model(path, "cpu", torch.float32, max_positions=64, progress=False)
    runner = ModelRunner.for_testing(model, cfg, block_size=4, num_blocks=32)
    return runner.logits_for(ids, chunk_size=chunk_size)


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.Tensor]:
    """(HF dir, transformers' logits on PROMPT) for each tiny model."""
    hf = MODELS[request.param]()
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return path, hf_logits(hf, PROMPT)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 16], ids=["full", "token-by-token", "chunks-of-3", "chunks-of-16"])
def test_logits_match_transformers(saved: tuple[str, torch.Tensor], chunk_size: int | None) -> None:
    # block_size 4 puts the 40 tokens in 10 cache blocks, so chunked runs read across block edges.
    path, expected = saved
    torch.testing.assert_close(kvserve_logits(path, PROMPT, chunk_size), expected, rtol=1e-4, atol=1e-4)


def test_config_read_from_transformers_dir(tmp_path: Path) -> None:
    hf = tiny_llama(llama3_rope=True)
    model, cfg = load_model(save_hf(hf, tmp_path), "cpu", torch.float32, max_positions=64, progress=False)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (4, 2, 2)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert not cfg.tie_word_embeddings and model.lm_head is not None


def test_untied_head_is_used(tmp_path: Path) -> None:
    # An untied model whose lm_head differs from its embedding must read lm_head: checks the head is not tied by mistake.
    hf = tiny_llama()
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    torch.testing.assert_close(kvserve_logits(save_hf(hf, tmp_path), PROMPT[:8]), hf_logits(hf, PROMPT[:8]),
                               rtol=1e-4, atol=1e-4)


# --- clear errors for broken checkpoints -------------------------------------------------------------------


def _edit_checkpoint(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_dir_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


def test_missing_path() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_model("/nonexistent/model", "cpu", torch.float32, 64, progress=False)


def test_dir_without_safetensors(tmp_path: Path) -> None:
    save_hf(tiny_llama(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.self_attn.k_proj.weight",
                                  "model.layers.0.mlp.up_proj.weight"])
def test_missing_tensor_is_named(tmp_path: Path, name: str) -> None:
    save_hf(tiny_llama(), tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.pop(name))
    layer_part = name.rsplit(".", 2)[0].replace("k_proj", "qkv_proj").replace("up_proj", "gate_up_proj")
    with pytest.raises(ValueError, match="missing") as err:
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)
    assert layer_part in str(err.value)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.0.self_attn.v_proj.weight"])
def test_shape_mismatch_is_named(tmp_path: Path, name: str) -> None:
    save_hf(tiny_llama(), tmp_path)

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:-1].clone()

    _edit_checkpoint(tmp_path, shrink)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    save_hf(tiny_llama(), tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.extra_adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.extra_adapter.weight"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


def test_unsupported_model_type(tmp_path: Path) -> None:
    save_hf(tiny_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mamba"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


def test_rotary_lookup_is_safe_across_threads() -> None:
    """The inspection path runs the same modules in another thread than the engine loop."""
    import threading

    from engine.models.layers import RotaryEmbedding

    rotary = RotaryEmbedding(head_dim=16, max_positions=256, theta=10000.0, scaling=None)
    rotary.build(torch.device("cpu"), torch.float32)
    qk = torch.randn(40, 6, 16)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    failures: list[object] = []

    def worker(offset: int) -> None:
        # HF's formulation written out: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
        angles = torch.outer(torch.arange(offset, offset + 40, dtype=torch.float32), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
        want = qk * cos + torch.cat([-qk[..., 8:], qk[..., :8]], dim=-1) * sin
        try:
            for _ in range(300):
                positions = torch.arange(offset, offset + 40)  # a new tensor each pass, as each forward has
                got = rotary(positions, qk)
                if not torch.allclose(got, want, atol=1e-5):
                    failures.append(offset)
                    return
        except Exception as exc:  # a thread's exception would otherwise only be a warning
            failures.append(exc)

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so a race shows
    try:
        threads = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 100, 200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures
