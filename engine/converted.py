"""A converted copy of a GGUF model, so that later starts skip parsing and dequantizing the GGUF.

On a small CPU box most of a cold start is the `gguf` reader walking ~150k metadata fields (the
vocabulary and merges) and dequantizing every tensor. The first load therefore writes the result
under $KVSERVE_HOME/converted/: the model's own parameters (safetensors, memory-mapped back), its
architecture and its tokenizer. The copy is keyed by the GGUF's name, size and mtime and by dtype,
so a changed file is converted again; delete the folder to reclaim the disk.

It also keeps the 4-bit grid each Linear weight lies on (a Q4_0/Q4_1/Q4_K tensor, dequantized): finding
it again in 100M fp32 weights took a third of a second of every start (models/int4_matmul.py); and the
8-bit grid of an LM head stored in Q8_0 (0.2 s for SmolLM2's, models/q8_matmul.py).
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
from engine.models.int4_matmul import FourBitGroups, four_bit_groups, packable
from engine.models.layers import Linear, check_loaded, set_param
from engine.models.q8_matmul import EightBitGroups, eight_bit_groups
from engine.models_registry import kvserve_home
from engine.tokenizer import Tokenizer

GRIDS_FILE = "four_bit_grids.safetensors"
HEAD_GRID_FILE = "lm_head_eight_bit_grid.safetensors"  # only where the LM head lies on one
FORMAT_VERSION = 3  # bump when what is written here changes meaning
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
    with safe_open(str(root / GRIDS_FILE), framework="pt", device="cpu") as f:
        for name in {key.rpartition(".")[0] for key in f.keys()}:  # noqa: SIM118 - safe_open has no __iter__
            grid = FourBitGroups(*(f.get_tensor(f"{name}.{part}") for part in FourBitGroups._fields))
            model.get_submodule(name).four_bit_grid = grid
    if (root / HEAD_GRID_FILE).is_file():
        with safe_open(str(root / HEAD_GRID_FILE), framework="pt", device="cpu") as f:
            model.lm_head_grid = EightBitGroups(*(f.get_tensor(part) for part in EightBitGroups._fields))
    model.post_load(torch.device(device), dtype)
    return model.eval(), cfg, Tokenizer.from_state(root)


def _find_four_bit_grids(model: nn.Module) -> dict[str, torch.Tensor]:
    """Give each Linear whose weight lies on a 4-bit grid its grid (packing this model need not look again),
    and return them all as tensors to save (q in uint8: 0..15)."""
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and packable(module.weight):
            grid = four_bit_groups(module.weight.detach().to("cpu"))
            if grid is not None:
                module.four_bit_grid = grid
                grid = grid._replace(q=grid.q.to(torch.uint8))
                tensors.update({f"{name}.{part}": value.contiguous() for part, value in grid._asdict().items()})
    return tensors


def _find_head_grid(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LM head's 8-bit grid (given to the model for packing, and returned to save), or {} when it has none."""
    grid = eight_bit_groups(model.lm_head_weight.detach().to("cpu"))
    if grid is None:
        return {}
    model.lm_head_grid = grid
    return {part: value.contiguous() for part, value in grid._asdict().items()}


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
        save_file(_find_four_bit_grids(model), str(staging / GRIDS_FILE))
        if head_grid := _find_head_grid(model):
            save_file(head_grid, str(staging / HEAD_GRID_FILE))
        (staging / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        tokenizer.save_state(staging)
        (staging / "complete").write_text("")
        os.replace(staging, target)  # atomic; loses the race harmlessly when another process got there first
        for stale in target.parent.glob(f"{target.name.rpartition('-v')[0]}-v*"):  # older formats of this copy
            if stale != target:
                shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        if not (target / "complete").is_file():
            log.warning("could not cache the converted model in %s: %s", target, exc)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
