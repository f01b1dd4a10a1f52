"""transformers `generate` as the reference peer: loading SmolLM2 and timing greedy generation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import HF_MODEL_DIR


def load_hf_model(hf_dir: Path = HF_MODEL_DIR, gguf: str | None = None):
    """SmolLM2 in fp32 from the peers' HF dir if present, else from the GGUF file (slow: dequantizes)."""
    from transformers import AutoModelForCausalLM

    if (hf_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    else:
        if gguf is None:
            from engine.models_registry import resolve_model

            gguf = resolve_model("smollm2-135m")
        path = Path(gguf)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a left-padded batch (what decoder-only batched generate expects)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


class _TokenClock:
    """A generate() streamer that only notes when each new token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


@dataclass
class HFRun:
    """One generate() call: wall seconds, new tokens, arrival time of each new token (batch 1), output ids."""

    seconds: float
    new_tokens: int
    token_times: list[float]
    output_ids: list[list[int]]


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, clock: bool = False) -> HFRun:
    """Greedy generate exactly max_new_tokens per prompt; with clock, note when each token arrives."""
    ids, mask = left_padded(prompts, pad_id)
    streamer = _TokenClock() if clock else None
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, pad_token_id=pad_id, streamer=streamer,
                             temperature=None, top_p=None, top_k=None)
    seconds = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    times = [t - start for t in streamer.times] if streamer else []
    return HFRun(seconds, new.numel(), times, new.tolist())
