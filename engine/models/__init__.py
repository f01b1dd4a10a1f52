"""The registry of model families: one line per family, each described in its own file (see family.py)."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models import gemma2, gemma3, gpt2, llama, phi3, qwen3
from engine.models.family import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    gpt2.FAMILY,
    qwen3.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    phi3.FAMILY,
)


def supported() -> str:
    """The families and what they load, for error messages."""
    return "; ".join(f"{f.arch} (config.json model_type {', '.join(f.hf_model_types)}; "
                     f"GGUF architecture {', '.join(f.gguf_archs) or 'none'})" for f in FAMILIES)


def family(arch: str) -> Family:
    """The family named by ModelConfig.arch."""
    for fam in FAMILIES:
        if fam.arch == arch:
            return fam
    raise ValueError(f"unsupported architecture {arch!r}; kvserve supports {supported()}")


def config_from_hf(cfg: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict, by its model_type; `source` names the file in errors."""
    model_type = cfg.get("model_type", "")
    for fam in FAMILIES:
        if model_type in fam.hf_model_types:
            try:
                return fam.from_hf(cfg)
            except KeyError as exc:
                raise ValueError(f"{source}: a {model_type} config needs the key {exc}") from None
    architectures = cfg.get("architectures") or []
    raise ValueError(f"{source}: unsupported model_type {model_type!r} (architectures {architectures}); "
                     f"kvserve supports {supported()}")


def family_for_gguf(gguf_arch: str, source: str) -> Family:
    for fam in FAMILIES:
        if gguf_arch in fam.gguf_archs:
            return fam
    archs = ", ".join(a for f in FAMILIES for a in f.gguf_archs)
    raise ValueError(f"{source}: unsupported GGUF architecture {gguf_arch!r}; kvserve loads {archs}")


def build_model(cfg: ModelConfig, max_positions: int) -> nn.Module:
    """Build the model's skeleton on the meta device: no memory until weights are assigned."""
    import torch

    model = family(cfg.arch).model
    with torch.device("meta"):
        return model(cfg, max_positions)
