"""Load a checkpoint (HF safetensors dir or GGUF file) into a model built on the meta device."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from engine.models import build_model, family
from engine.models.layers import check_loaded

Tensors = Iterator[tuple[str, torch.Tensor]]


def read_model_config(path: str) -> ModelConfig:
    """The architecture of a GGUF file or HF checkpoint dir, without loading weights."""
    if os.path.isdir(path):
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is a directory without config.json: not an HF checkpoint")
        return ModelConfig.from_hf(json.loads(config_file.read_text()), str(config_file))
    if os.path.isfile(path):
        from engine.gguf_loader import read_gguf_config

        return read_gguf_config(path)
    raise ValueError(f"model path {path!r} does not exist")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path} (kvserve does not load .bin checkpoints)")
    return files


def _hf_tensors(path: Path, bar: tqdm) -> Tensors:
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                bar.update(1)
                yield name, f.get_tensor(name)


def _count_hf_tensors(path: Path) -> int:
    total = 0
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            total += len(f.keys())
    return total


def load_model(path: str, device: str, dtype: torch.dtype, max_positions: int,
               progress: bool = True) -> tuple[nn.Module, ModelConfig]:
    """Build the model on meta, then assign each checkpoint tensor converted to (device, dtype)."""
    cfg = read_model_config(path)
    model = build_model(cfg, max_positions)
    if os.path.isdir(path):
        total = _count_hf_tensors(Path(path))
        bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False)
        tensors = _hf_tensors(Path(path), bar)
    else:
        from engine.gguf_loader import gguf_tensor_count, gguf_tensors

        bar = tqdm(total=gguf_tensor_count(path), desc="loading weights", unit="tensor",
                   disable=not progress, leave=False)
        tensors = gguf_tensors(path, cfg, bar)
    with bar:
        for name, tensor in tensors:
            model.load_weight(name, tensor.to(device=device, dtype=dtype))
    missing = model.missing_weights()
    if missing:
        raise ValueError(_missing_message(path, cfg, missing))
    check_loaded(model)
    model.post_load(torch.device(device), dtype)
    return model.eval(), cfg


def _missing_message(path: str, cfg: ModelConfig, missing: list[str]) -> str:
    """Which tensors the checkpoint lacks, in the file's own names (llama.cpp's for a GGUF)."""
    if os.path.isdir(path):
        shown, where = missing, f"{path} (safetensors)"
    else:
        fam = family(cfg.arch)
        shown = []
        for name in missing:
            hf_name = name.split(" (part of ")[0]
            shown.append(fam.gguf_name(hf_name) or hf_name)
        where = f"GGUF file {path}"
    listed = ", ".join(shown[:8]) + (" ..." if len(shown) > 8 else "")
    return f"{where} is missing {len(missing)} tensor(s) a {cfg.arch} model needs: {listed}"
