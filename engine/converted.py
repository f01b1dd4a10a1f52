"""A converted copy of a GGUF model, so that later starts skip parsing and dequantizing the GGUF.

On a small CPU box most of a cold start is the `gguf` reader walking ~150k metadata fields (the
vocabulary and merges) and dequantizing every tensor. The first load therefore writes the result
under $KVSERVE_HOME/converted/: the model's own parameters (safetensors, memory-mapped back), its
architecture and its tokenizer. The copy is keyed by the GGUF's name, size and mtime and by dtype,
so a changed file is converted again; delete the folder to reclaim the disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.config import ModelConfig
from engine.models import build_model
from engine.models.layers import check_loaded, set_param
from engine.models_registry import kvserve_home
from engine.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when what is written here changes meaning
log = logging.getLogger("kvserve.engine")


def converted_dir(gguf_path: str, dtype: torch.dtype) -> Path:
    stat = os.stat(gguf_path)
    key = f"{Path(gguf_path).stem}-{stat.st_size}-{stat.st_mtime_ns}-{str(dtype).removeprefix('torch.')}"
    return kvserve_home() / "converted" / f"{key}-v{FORMAT_VERSION}"


def load_converted(gguf_path: str, device: str, dtype: torch.dtype,
                   max_len: int | None) -> tuple[nn.Module, ModelConfig, Tokenizer] | None:
    """The model, its config and tokenizer from the converted copy, or None when there is none."""
    root = converted_dir(gguf_path, dtype)
    if not (root / "complete").is_file():
        return None
    cfg = ModelConfig(**json.loads((root / "config.json").read_text()))
    max_positions = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    model = build_model(cfg, max_positions)
    with safe_open(str(root / "model.safetensors"), framework="pt", device="cpu") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            module_name, _, param = name.rpartition(".")
            set_param(model.get_submodule(module_name), param, f.get_tensor(name).to(device=device, dtype=dtype))
    check_loaded(model)
    model.post_load(torch.device(device), dtype)
    return model.eval(), cfg, Tokenizer.from_state(root)


def save_converted(gguf_path: str, dtype: torch.dtype, model: nn.Module, cfg: ModelConfig,
                   tokenizer: Tokenizer) -> None:
    """Write the converted copy; best effort (a read-only or full disk only costs the next start time)."""
    target = converted_dir(gguf_path, dtype)
    if (target / "complete").is_file():
        return
    staging: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        tensors = {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters()}
        save_file(tensors, str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        tokenizer.save_state(staging)
        (staging / "complete").write_text("")
        os.replace(staging, target)  # atomic; loses the race harmlessly when another process got there first
    except OSError as exc:
        if not (target / "complete").is_file():
            log.warning("could not cache the converted model in %s: %s", target, exc)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
