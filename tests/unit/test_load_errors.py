"""Checkpoints kvserve cannot serve fail at load with the file, what is missing and what is supported."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers.tiny_engine import _tokenizer
from helpers.tiny_families import tiny_qwen3, write_family_gguf
from helpers.tiny_models import save_hf, tiny_llama

from engine.gguf_loader import open_gguf
from engine.llm import LLM
from engine.weights import load_model


def test_unknown_architecture_in_config_json(tmp_path: Path) -> None:
    save_hf(tiny_llama(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="mamba", architectures=["MambaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)
    message = str(err.value)
    assert str(tmp_path / "config.json") in message and "'mamba'" in message and "MambaForCausalLM" in message
    for supported in ("llama", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"):
        assert supported in message


def test_config_json_missing_a_key(tmp_path: Path) -> None:
    save_hf(tiny_qwen3(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: a qwen3 config needs the key 'num_hidden_layers'"):
        load_model(str(tmp_path), "cpu", torch.float32, 64, progress=False)


def _without(src: str, dst: Path, dropped: set[str]) -> str:
    """A copy of a GGUF file without some tensors."""
    reader = open_gguf(src)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith(f"{arch}.") or field.name.startswith("tokenizer."):
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name not in dropped:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(dst)


def test_gguf_missing_tensors_named_as_llama_cpp_names_them(tmp_path: Path) -> None:
    whole = write_family_gguf(tiny_qwen3(), tmp_path / "whole.gguf")
    cut = _without(whole, tmp_path / "cut.gguf", {"blk.1.attn_k_norm.weight", "blk.0.attn_k.weight",
                                                   "output_norm.weight"})
    with pytest.raises(ValueError) as err:
        load_model(cut, "cpu", torch.float32, 64, progress=False)
    message = str(err.value)
    assert "cut.gguf" in message and "missing 3 tensor(s)" in message and "qwen3" in message
    for name in ("blk.1.attn_k_norm.weight", "blk.0.attn_k.weight", "output_norm.weight"):
        assert name in message


def test_unknown_gguf_architecture_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"rwkv\.gguf: unsupported GGUF architecture 'rwkv6'; kvserve loads .*gemma3"):
        load_model(str(path), "cpu", torch.float32, 64, progress=False)


def test_tokenizer_larger_than_the_vocabulary(tmp_path: Path) -> None:
    save_hf(tiny_llama(), tmp_path)  # 96 embedding rows
    tokenizer = _tokenizer()  # ~320 tokens
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError) as err:
        LLM(str(tmp_path), device="cpu", dtype="float32", quantization="none")
    message = str(err.value)
    assert str(tmp_path / "tokenizer.json") in message
    assert f"{tokenizer.get_vocab_size(with_added_tokens=True)} tokens" in message and "has 96" in message
