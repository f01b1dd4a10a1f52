"""Building blocks shared by the model families: norms, rotary embeddings, weight loading helpers."""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.int4_matmul import FourBitGroups


class DirectCall:
    """Calling the module runs its forward and nothing else: no hooks, no tracing checks.

    nn.Module.__call__ costs ~1.3 µs for the hooks kvserve never registers, and a decode step makes ~10 module
    calls a layer: 0.4 ms of SmolLM2's 9 ms step at batch 1 (2-core Zen 4). Put it first among the bases.
    """

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def pin_submodules(model: nn.Module) -> None:
    """Make `self.child` a plain instance attribute of every module of the model, for the decode step's sake.

    nn.Module keeps submodules in `_modules` and finds them through `__getattr__`, which Python calls only
    after the normal lookup has failed: ~0.7 µs each, and a decode step makes ~300 of them (10 a layer).
    A copy in the instance's `__dict__` is found first. Assigning a module later stays right: nn.Module's
    `__setattr__` drops the name from `__dict__` before it registers the new one. Call it once the model is built.
    """
    for module in model.modules():
        module.__dict__.update(module._modules)


class RMSNorm(DirectCall, nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # a parameter: each lookup goes through nn.Module.__getattr__
        if (kernel := _native_rms_norm(x, weight)) is not None:
            out = torch.empty_like(x := x.contiguous())
            kernel(out.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], self.eps)
            return out
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precisions normalise in fp32 as the reference does, then scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): a layer's residual add and the norm after it, in one native pass
        where the kernel runs (the same bits as the add, then forward), else PyTorch's add, then forward."""
        kernel, weight = None, self.weight
        if type(self).forward is RMSNorm.forward and x.shape == residual.shape and x.dtype == residual.dtype:
            kernel = _native_rms_norm(x, weight, with_residual=True)
        if kernel is None:
            total = x + residual
            return total, self(total)
        x, residual = x.contiguous(), residual.contiguous()
        total, out = torch.empty_like(x), torch.empty_like(x)
        kernel(out.data_ptr(), total.data_ptr(), x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
               x.numel() // x.shape[-1], x.shape[-1], self.eps)
        return total, out


_RMS_NORM_SYMBOLS = {torch.float32: "kvserve_rms_norm_f32", torch.bfloat16: "kvserve_rms_norm_bf16"}
_ADD_RMS_NORM_SYMBOLS = {torch.float32: "kvserve_add_rms_norm_f32", torch.bfloat16: "kvserve_add_rms_norm_bf16"}


def _native_rms_norm(x: torch.Tensor, weight: torch.Tensor, with_residual: bool = False) -> Callable[..., None] | None:
    """kvserve's CPU RMSNorm kernel (csrc/rms_norm.cpp) for x and weight, or None: PyTorch's then.

    PyTorch's CPU rms_norm is five elementwise passes and a reduction: 8 µs a 576-float row where the kernel
    takes 2, and 61 of them a decode step. The kernel computes what RMSNorm.forward's PyTorch lines do (bitwise for
    bf16, within an ulp for fp32), each row alone. `with_residual`: the kernel that first adds a residual.
    """
    symbol = (_ADD_RMS_NORM_SYMBOLS if with_residual else _RMS_NORM_SYMBOLS).get(x.dtype)
    if symbol is None or x.device.type != "cpu" or weight.dtype != x.dtype:
        return None
    pointers = 5 if with_residual else 3
    return _native_function(symbol, *[ctypes.c_void_p] * pointers, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate_up is [gate | up] on its last axis: SwiGLU's middle.

    One pass of csrc/elementwise.cpp for fp32 on CPU (PyTorch's chunk, silu and mul are three dispatches and a
    temporary: 11 µs a row at SmolLM2's width, 30 times a decode step), within a few ulp of PyTorch's.
    """
    kernel = None
    if gate_up.dtype == torch.float32 and gate_up.is_cpu:
        kernel = _native_function("kvserve_silu_mul_f32", *[ctypes.c_void_p] * 2, ctypes.c_int64, ctypes.c_int64)
    if kernel is None:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    kernel(out.data_ptr(), gate_up.data_ptr(), gate_up.numel() // gate_up.shape[-1], width)
    return out


def residual_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """x + residual: one native call for fp32 on CPU (csrc/elementwise.cpp, the same sums), else PyTorch's add."""
    kernel = None
    if x.dtype == residual.dtype == torch.float32 and x.is_cpu and x.shape == residual.shape:
        kernel = _native_function("kvserve_add_f32", *[ctypes.c_void_p] * 3, ctypes.c_int64)
    if kernel is None:
        return x + residual
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    kernel(out.data_ptr(), x.data_ptr(), residual.data_ptr(), x.numel())
    return out


@functools.cache
def _native_function(symbol: str, *argtypes) -> Callable[..., None] | None:
    from engine import native

    try:
        return native.function(symbol, *argtypes)
    except native.KernelUnavailable:  # no compiler here: engine/paged_decode.py's fallback warns about it
        return None


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in fp32, then casts back (transformers' Gemma2/3RMSNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


ROPE_TYPES = ("default", "linear", "llama3", "longrope", "freq_factors")


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of rotary embeddings over `dim` rotated dims, and the factor cos/sin are scaled by.

    HF's 'linear', 'llama3' and 'longrope' (Phi-3's "su") scalings. LongRoPE picks its long factors when
    the served context (max_positions) is longer than the original one, as llama.cpp does by context
    size; transformers picks them per forward by sequence length, which a batch of sequences cannot.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not scaling:
        return inv_freq.float(), 1.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float(), 1.0
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float(), 1.0
    if kind == "freq_factors":  # GGUF: llama.cpp stores Llama-3 scaling as one divisor per frequency
        return (inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64)).float(), 1.0
    if kind in ("longrope", "su"):
        original = scaling["original_max_position_embeddings"]
        factors = scaling["long_factor"] if max_positions > original else scaling["short_factor"]
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            factor = scaling.get("factor") or scaling["max_position_embeddings"] / original
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return (inv_freq / torch.tensor(factors, dtype=torch.float64)).float(), float(attention_factor)
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float(), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")


class RotaryEmbedding(DirectCall, nn.Module):
    """Precomputed cos/sin per position; applied with HF's rotate-half layout to the first rotary_dim dims."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.rotary_dim = rotary_dim or head_dim  # Phi-3/4's partial rotary: the rest passes unrotated
        self.theta, self.scaling = theta, scaling
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None  # with the sign of rotate-half folded in: (-sin, +sin) halves
        self._lookup: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """Fill the cos/sin tables once the model has left the meta device."""
        inv_freq, factor = rope_inv_freq(self.rotary_dim, self.theta, self.scaling, self.max_positions)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos = (torch.cat([freqs, freqs], dim=-1).cos() * factor).to(device=device, dtype=dtype)
        self.sin = (torch.cat([-freqs, freqs], dim=-1).sin() * factor).to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, qk: torch.Tensor) -> torch.Tensor:
        """q and k heads side by side, (T, H + KVH, D), rotated by their positions (T,)."""
        if (kernel := self._native(positions, qk)) is not None:
            out = torch.empty(qk.shape)
            tokens, heads, head_dim = qk.shape
            kernel(out.data_ptr(), qk.data_ptr(), qk.stride(0), positions.data_ptr(), self.cos.data_ptr(),
                   self.sin.data_ptr(), tokens, heads, head_dim)
            return out
        # Every layer of a forward pass gets the same positions tensor: look cos/sin up once. The cache is
        # one tuple, swapped atomically and checked against our own tensor, because the inspection path
        # runs the same modules from another thread.
        cached = self._lookup
        if cached is not None and cached[0] is positions:
            _, cos, sin = cached
        else:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
            self._lookup = (positions, cos, sin)
        # rotate_half(x) = (-x2, x1) = roll(x) * (-1, +1), and the signs are already in `sin`.
        if self.rotary_dim == self.head_dim:
            return qk * cos + qk.roll(self.head_dim // 2, dims=-1) * sin
        rotated, passed = qk.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        return torch.cat([rotated * cos + rotated.roll(self.rotary_dim // 2, dims=-1) * sin, passed], dim=-1)


    def _native(self, positions: torch.Tensor, qk: torch.Tensor) -> Callable[..., None] | None:
        """kvserve's rotary kernel (csrc/rotary.cpp: PyTorch's bits, one call) where it takes these tensors, else None."""
        if (qk.dtype != torch.float32 or qk.device.type != "cpu" or self.rotary_dim != self.head_dim
                or self.cos.dtype != torch.float32 or qk.stride(2) != 1 or qk.stride(1) != self.head_dim
                or positions.dtype != torch.long or not positions.is_contiguous()):
            return None
        return _rotary_function()


def _rotary_function() -> Callable[..., None] | None:
    return _native_function("kvserve_rotary_f32", *[ctypes.c_void_p] * 2, ctypes.c_int64, *[ctypes.c_void_p] * 3,
                            *[ctypes.c_int64] * 3)


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a (meta) parameter by a real tensor, checking its shape."""
    old = module._parameters[name]
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch for {type(module).__name__}.{name}: "
                         f"model expects {tuple(old.shape)}, checkpoint has {tuple(value.shape)}")
    module._parameters[name] = nn.Parameter(value, requires_grad=False)


def check_loaded(model: nn.Module) -> None:
    """Raise when some parameter was never given a value by the checkpoint."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")


class Linear(DirectCall, nn.Linear):
    """nn.Linear whose CPU forward can run a kernel over a weight packed once at load (see cpu_matmul).

    The original weight stays for everything else (tied embeddings, the inspection path, CUDA).
    """

    kernel: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The 4-bit grid the weight lies on, when the converted copy of a GGUF stored it (engine/converted.py):
    # packing then skips looking for it. Dropped once packed.
    four_bit_grid: FourBitGroups | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        for p in self.parameters():
            p.requires_grad_(False)

    def reset_parameters(self) -> None:
        """No random init: the weights come from the checkpoint (check_loaded says when one did not). On the
        meta device nn.Linear's init still cost 0.3 ms a layer, 40 ms of a start for SmolLM2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.is_cpu:
            return self.kernel(x)
        return F.linear(x, self.weight, self.bias)
