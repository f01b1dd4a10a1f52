"""Model architecture and engine settings, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention import AttentionSpec
from engine.paged_decode import BACKENDS as ATTENTION_BACKENDS
from engine.speculative import NgramConfig


@dataclass(slots=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, read from config.json or GGUF metadata.

    Each family maps its checkpoints onto these fields (engine/models/<family>.py); `arch` names the family.
    """

    arch: str  # a family in engine/models/__init__.py: "llama" (Llama/SmolLM2/Mistral/Qwen2), "qwen3", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF's dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included (Mistral, Gemma)
    layer_types: list[str] | None = None  # per layer "sliding_attention" or "full_attention"; None: all alike
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (Gemma); None: head_dim
    attn_softcap: float | None = None  # attention score soft-capping (Gemma 2)
    final_softcap: float | None = None  # logit soft-capping (Gemma 2)
    rope_local_theta: float | None = None  # RoPE base of sliding layers, when it differs (Gemma 3)
    partial_rotary_factor: float = 1.0  # share of head_dim that is rotated (Phi-3.5/4-mini)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, the model has {self.num_layers}")

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def window_of_every_layer(self) -> int | None:
        """The sliding window when every layer slides (Mistral): keys older than it are never read again."""
        if self.sliding_window is None or not all(self.is_sliding(i) for i in range(self.num_layers)):
            return None
        return self.sliding_window

    def attention_spec(self, layer: int) -> AttentionSpec:
        """How `layer` attends: scale, window and soft-capping."""
        scalar = self.query_pre_attn_scalar or self.head_dim
        return AttentionSpec(layer=layer, scale=scalar ** -0.5,
                             window=self.sliding_window if self.is_sliding(layer) else None,
                             softcap=self.attn_softcap)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict, through the family that knows its model_type."""
        from engine.models import config_from_hf  # the registry imports this module

        return config_from_hf(cfg, source)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' (or None) means fp32 on CPU and bf16 on CUDA."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_device(name: str | None) -> str:
    """'auto' (or None) picks CUDA when available."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return name


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs: device, batch limits and KV-cache size."""

    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_bytes: int | None = None  # None: kv_cache_fraction of free memory (capped, see runner)
    kv_cache_fraction: float = 0.5
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    cache_converted: bool = True  # keep a converted copy of a GGUF in $KVSERVE_HOME/converted (CPU fp32)
    # n-gram speculative decoding (engine/speculative.py): on, acting while at most 2 sequences run; None: off
    speculative: NgramConfig | None = field(default_factory=NgramConfig)
    # A request's output independent of everything else the engine does: prompt tokens' attention through the
    # paged kernel too (decode rows always are), so neither the batch nor prefix-cache hits, prompt chunking
    # or preemption change a bit; prompt attention is then slower on long prompts (README: How it works). On
    # the gather + SDPA path (attention_backend="sdpa") it runs decode attention on one thread instead.
    batch_invariant: bool = False
    # Decode attention: auto (kvserve's paged CPU kernel wherever it builds, engine/paged_decode.py), native
    # (the kernel or an error), sdpa (gather the blocks, PyTorch's SDPA: CUDA always takes this path).
    attention_backend: str = "auto"
    quantization: str = "auto"  # CPU matmul weights: auto, none (exact fp32), bf16, fp16, int8, int4; see models/cpu_matmul.py
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every running sequence needs a slot)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be positive")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
