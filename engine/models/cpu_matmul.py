"""How the CPU matmuls hold their weights: `quantization` none, bf16, fp16, int8 or int4.

Decoding on a small CPU is a stream of weight reads (batch 1) or of fp32 multiply-adds (batch 64),
and PyTorch's default `F.linear` is slow at both, because MKL repacks the weight on every call. So each
`Linear` (and the LM head) gets a kernel over a weight packed once at load:

- none: oneDNN-prepacked fp32 weights. Exact: what the tests compare with transformers.
- bf16: oneDNN's bf16 GEMM on AMX tiles (Intel Sapphire Rapids and later): weights and the activations
  entering the matmul rounded to bf16, fp32 accumulation. Several times fp32's speed at batch 16-64;
  on SmolLM2 perplexity moves by ~0.1%. `auto` picks it where the CPU has AMX, and it is refused
  without AMX, where oneDNN's bf16 GEMM cannot keep a row's result independent of its batch.
- fp16: fbgemm's fp16 GEMM: weights rounded to fp16 (half the bytes to read), activations and
  accumulation stay fp32. On SmolLM2 Q4_1 logits move by < 0.05 and perplexity by < 0.01%.
- int8: fbgemm's int8 GEMM: 7-bit per-output-channel weights, 8-bit activations scaled per row.
  Fewest bytes to read (the fastest batch-1 decode), and lossy (SmolLM2: perplexity +6-12%, see the
  README), so it is opt-in.
- int4: 4-bit weights in groups of 32 with a scale and an offset, bf16 activations (int4_matmul.py).
  A quarter of fp16's bytes, so the fastest batch-1 decode.
- int4-a8: `auto`'s weights, with the rows entering the 4-bit layers quantized to 8 bits per group of 32
  (w4a16_matmul.py's w4a8_linear), as llama.cpp multiplies its 4-bit weights: 1.45-2x faster 4-bit layers on
  AVX2, and lossier (SmolLM2: KL 0.016 to fp32, perplexity +0.5%; see the README), so it is opt-in.

`auto` keeps weights that are already 4-bit in the file (a GGUF's Q4_0/Q4_1/Q4_K tensors) in int4, which
rounds only their group scales and the activations to bf16, and gives the rest bf16 where the CPU has
AMX, else fp16 where fbgemm runs (PyTorch's x86 builds), else none. What the CPU has is asked of
engine/cpu_features.py; `kvserve cpu-features` prints it and the choice it makes.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from engine.cpu_features import CpuFeatures, detect
from engine.machine_cache import remembered
from engine.models.int4_matmul import (
    FourBitGroups,
    four_bit_groups,
    int4_kernel_choice,
    int4_linear,
    packable,
    round_to_four_bits,
)
from engine.models.q8_matmul import eight_bit_groups, q8_kernel_runs, q8_linear
from engine.models.w4a16_matmul import w4a8_kernel, w4a8_linear

Kernel = Callable[[torch.Tensor], torch.Tensor]
QUANTIZATIONS = ("auto", "none", "bf16", "fp16", "int8", "int4", "int4-a8")
FORMATS = QUANTIZATIONS[1:]  # the formats a flag can ask for

# fbgemm's AVX2 int8 kernel sums pairs of u8 x s8 products in int16; 255 * 63 * 2 < 32767, so 7-bit
# weights never saturate with full 8-bit activations (the alternative, 7-bit activations, loses more).
_INT8_WEIGHT_MAX = 63


def format_refusal(quantization: str, features: CpuFeatures | None = None) -> str | None:
    """Why this CPU cannot run a format with batch-invariant results, or None where it can.

    'bf16' also answers for a whole bf16 model on CPU (--dtype bfloat16): the same GEMM runs its matmuls.
    """
    features = features or detect()
    if quantization == "bf16" and not features.avx512_bf16:
        return "needs a CPU with AVX-512 bf16 and AMX; this one has neither (oneDNN would emulate bf16, slowly)"
    if quantization == "bf16" and not features.amx:
        # Measured on AMD Zen 4: the split changes from 2 rows on (2 threads) or ~15 (1 thread), and only some
        # rows show it, so no block size found at load can be trusted; fixed padded blocks would cost more
        # than fp16 saves. See the README's CPU table.
        return ("needs AMX (Intel Sapphire Rapids or later); this CPU has AVX-512 bf16 but no AMX, and there "
                "oneDNN's bf16 GEMM splits a row's sum differently with the number of rows in the call, so a "
                "request's output would depend on its batch")
    if quantization in ("fp16", "int8") and not features.fbgemm:
        return "needs PyTorch's fbgemm backend (x86 builds)"
    if quantization == "int4" and not features.avx2:
        return "needs an x86 CPU with AVX2 or AVX-512 (PyTorch's packed int4 kernel is vectorized only there)"
    if quantization == "int4-a8" and not features.avx2:
        return "needs an x86 CPU with AVX2 (kvserve's 8-bit-row kernel is written for it)"
    return None


def resolve_quantization(name: str | None, device: str, dtype: torch.dtype,
                         features: CpuFeatures | None = None) -> str:
    """'auto' (or None) for the CPU fp32 model: bf16 on AMX, else fp16 where fbgemm runs, else none.

    Raises ValueError for a format (or a bf16 model on CPU) that this CPU cannot run batch-invariantly.
    """
    name = name or "auto"
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if device == "cpu" and dtype == torch.bfloat16 and (reason := format_refusal("bf16", features)):
        raise ValueError(f"dtype=bfloat16 on CPU {reason}; use dtype float32 (quantization auto picks "
                         f"{resolve_quantization('auto', 'cpu', torch.float32, features)})")
    cpu_fp32 = device == "cpu" and dtype == torch.float32
    if name == "auto":
        if not cpu_fp32:
            return "none"
        return next(f for f in ("bf16", "fp16", "none") if format_refusal(f, features) is None)
    if name != "none" and not cpu_fp32:
        raise ValueError(f"quantization={name} is a CPU fp32 kernel; on {device} with {dtype} use dtype instead")
    if reason := format_refusal(name, features):
        fallback = "fp16" if format_refusal("fp16", features) is None else "none"
        raise ValueError(f"quantization={name} {reason}; use {fallback}")
    if name == "int4-a8" and features is None and w4a8_kernel() is None:
        from engine import native

        raise ValueError(f"quantization=int4-a8 needs kvserve's native kernels, which cannot run here "
                         f"({native.unavailable_reason()}); use auto")
    return name


def keeps_4bit(name: str | None, device: str, dtype: torch.dtype, features: CpuFeatures | None = None) -> bool:
    """Whether `auto` (or int4-a8) keeps weights stored in 4 bits as int4 here (CPU fp32 models, where the kernel
    runs)."""
    return ((name or "auto") in ("auto", "int4-a8") and device == "cpu" and dtype == torch.float32
            and format_refusal("int4", features) is None)


def make_kernel(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str,
                keep_4bit: bool = False, grid: FourBitGroups | None = None) -> tuple[Kernel | None, str]:
    """x -> x @ weight.T + bias over a packed copy of the weight (None: use F.linear), and its format.

    keep_4bit (what `auto` asks): a weight already on a 4-bit grid gets int4, the rest `quantization`.
    `quantization` int4 rounds every weight the kernel can take to 4 bits; the others (shapes it cannot
    pack) get fp16. int4-a8 takes `auto`'s weights (keep_4bit), the 4-bit ones multiplied by 8-bit rows.
    `grid`: the weight's 4-bit grid when it is already known (else it is looked for).
    """
    if weight.device.type != "cpu":
        return None, "none"
    if weight.dtype == torch.bfloat16:  # a bf16 model (--dtype bfloat16): the same kernel, minus the casts
        return (_bf16_kernel(weight, bias), "bf16") if detect().avx512_bf16 else (None, "none")
    if weight.dtype != torch.float32:
        return None, "none"
    if (keep_4bit or quantization == "int4") and packable(weight):
        groups = grid if grid is not None else four_bit_groups(weight)
        if groups is None and quantization == "int4":
            groups = round_to_four_bits(weight)
        if groups is not None and quantization == "int4-a8" and (linear := w4a8_linear(groups, bias)) is not None:
            return linear, "int4-a8"
        if groups is not None:
            return _row_blocked("int4", int4_linear(groups, bias), *weight.shape), "int4"
    if quantization == "int4":
        quantization = "fp16"
    if quantization == "int4-a8":  # the weights not stored in 4 bits: what `auto` gives them
        quantization = resolve_quantization("auto", "cpu", torch.float32)
    return _float_kernel(weight, bias, quantization), quantization


def _float_kernel(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str) -> Kernel | None:
    if quantization == "fp16":
        return _fp16_kernel(weight, bias)
    if quantization == "int8":
        return _int8_kernel(weight, bias)
    if quantization == "bf16":
        return _bf16_kernel(weight, bias)
    return _onednn_kernel(weight, bias)


def _onednn_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel | None:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)  # 16: a batch-size hint for the layout
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _bf16_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    return _row_blocked("bf16", _bf16_linear(weight, bias), *weight.shape)


def _row_blocked(kind: str, linear: Kernel, out_features: int, in_features: int) -> Kernel:
    """The kernel, called in blocks of at most the row count that keeps every row's result its own.

    A kernel marked `batch_invariant` (kvserve's integer kernels: each row's sums are exact integers) is
    returned as it is: nothing to measure, and no wrapper call in each of a step's matmuls.
    """
    if getattr(linear, "batch_invariant", False):
        return linear
    block = _safe_block_rows(kind, linear, out_features, in_features)

    def blocked(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in_features)
        if x.shape[0] <= block:
            return linear(x)
        return torch.cat([linear(part) for part in x.split(block)])

    return blocked


def _bf16_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    # Batch-size hint 1 when packing: larger hints pick layouts whose rounding depends on the row count.
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 1)
    bias16 = None if bias is None else bias.bfloat16()
    # Output in the input's dtype: fp32 models cast in and out, bf16 models (casts are no-ops) do not.
    return lambda x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, bias16, "none", [], "").to(x.dtype)


# oneDNN may split a GEMM's reduction across threads once there are enough rows, and then a row's sum is
# rounded differently from when it is computed alone (PyTorch's int4 kernel may too: it switches to a
# blocked GEMM for more rows on some CPUs, so it gets the same check). Which row counts do that depends on the shape and
# the thread count, so it is measured, once per shape and machine, on the first weight of that shape: calls are cut
# into blocks of a row count up to which every smaller count gives each row its single-row result. A
# different sum shows only in the rows whose rounding it happens to change, so the probe uses rows of
# very different scales and checks each count on every row of the sample. (For bf16 only AMX gets here:
# elsewhere the split changes from 2 rows on and bf16 is refused, see format_refusal.)
_BLOCK_CANDIDATES = (64, 32, 16, 8)
_PROBE_ROWS = 80


def _safe_block_rows(kind: str, linear: Kernel, out_features: int, in_features: int) -> int:
    # Remembered across starts (engine/machine_cache.py): measuring the LM head alone takes about a second.
    name = f"safe_block_rows:{kind}:{out_features}x{in_features}:threads={torch.get_num_threads()}"
    return remembered(name, lambda: _measure_safe_block_rows(linear, in_features))


def _measure_safe_block_rows(linear: Kernel, in_features: int) -> int:
    x = torch.randn(_PROBE_ROWS, in_features, generator=torch.Generator().manual_seed(0))
    x[::3] *= 40.0
    alone = torch.cat([linear(row) for row in x.split(1)])

    def rows_independent(count: int) -> bool:  # every probe row, in calls of `count` rows
        starts = [*range(0, _PROBE_ROWS - count + 1, count), _PROBE_ROWS - count]
        return all(torch.equal(linear(x[start:start + count]), alone[start:start + count]) for start in starts)

    consistent = 1
    while consistent < _BLOCK_CANDIDATES[0] and rows_independent(consistent + 1):
        consistent += 1
    return max([c for c in _BLOCK_CANDIDATES if c <= consistent], default=1)


def _fp16_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    def fp16_linear(x: torch.Tensor) -> torch.Tensor:  # x: (rows, in_features), as the models call it
        rows = x.shape[0]
        padded = _fp16_padded_rows(rows)
        if padded == rows:
            return torch.ops.quantized.linear_dynamic_fp16(x, packed)
        return torch.ops.quantized.linear_dynamic_fp16(F.pad(x, (0, 0, 0, padded - rows)), packed)[:rows]

    return fp16_linear


# fbgemm's fp16 GEMM cuts the rows into tiles of 1 to 6 rows (blocks of at most 120) by a fixed table, and
# its 1- and 2-row tiles round differently from the others. A row's result would then depend on how many
# rows share its call; padding the row count to one whose tiling has no such tile keeps it independent.
_FP16_BLOCK_ROWS = 120


def _fp16_padded_rows(rows: int) -> int:
    if rows < _FP16_BLOCK_ROWS:
        return _fp16_safe_row_counts()[rows]
    full, rest = divmod(rows, _FP16_BLOCK_ROWS)
    return full * _FP16_BLOCK_ROWS + (_fp16_safe_row_counts()[rest] if rest else 0)


@functools.cache
def _fp16_safe_row_counts() -> tuple[int, ...]:
    """For each row count r <= 120, the smallest count >= r whose rows all match a full block's results.

    Measured once (about 10 ms) rather than copied from fbgemm, whose tables differ by CPU generation.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_FP16_BLOCK_ROWS, 256, generator=gen)
    packed = torch.ops.quantized.linear_prepack_fp16(torch.randn(64, 256, generator=gen), None)
    reference = torch.ops.quantized.linear_dynamic_fp16(x, packed)
    safe = [r for r in range(1, _FP16_BLOCK_ROWS + 1)
            if torch.equal(torch.ops.quantized.linear_dynamic_fp16(x[:r], packed), reference[:r])]
    return (0, *(min(s for s in safe if s >= r) for r in range(1, _FP16_BLOCK_ROWS + 1)))


def _int8_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    scales = (weight.abs().amax(dim=1) / _INT8_WEIGHT_MAX).clamp_min(1e-12)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a public API, not in fbgemm
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qweight, None)
    # fbgemm picks one activation scale for the whole batch from its min and max. Scaling every row to
    # max |x| = 1 and adding a row holding +1 and -1 pins that range to [-1, 1] whatever else is in the
    # batch, so each row is quantized alone: a request's output does not depend on its neighbours.
    sentinel = torch.zeros(1, weight.shape[1])
    sentinel[0, 0], sentinel[0, -1] = 1.0, -1.0

    def int8_linear(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        y = torch.ops.quantized.linear_dynamic(torch.cat([rows / row_scale, sentinel]), packed, False)
        y = y[:-1].mul_(row_scale)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], -1)

    return int8_linear


def pack_linears(model: torch.nn.Module, quantization: str, keep_4bit: bool = False) -> str:
    """Give every Linear of a CPU fp32 or bf16 model, and its LM head, a packed kernel (a no-op elsewhere).

    Returns the formats in use, e.g. "int4+fp16" (int4 first). Packing runs on all intra-op threads:
    fbgemm's fp16 packing converts element by element (~1.5 s for SmolLM2 on one core), which would
    otherwise dominate a cold start.
    """
    from engine.models.layers import Linear

    linears = [m for m in model.modules() if isinstance(m, Linear)]
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        head = pool.submit(_head_kernel, model, quantization, keep_4bit)
        kernels = list(pool.map(lambda m: make_kernel(m.weight, m.bias, quantization, keep_4bit, m.four_bit_grid),
                                linears))
        for module, (kernel, _) in zip(linears, kernels, strict=True):
            module.kernel, module.four_bit_grid = kernel, None
        model.lm_head_kernel, head_format = head.result()
    used = {head_format, *(name for _, name in kernels)}
    return "+".join(sorted(used, key=lambda name: (not name.startswith("int4"), name)))


def rows_cost_arithmetic(formats: str) -> bool:
    """Whether a decode step in `formats` (pack_linears') costs nearly its own arithmetic per row from 2 rows: the
    4-bit layers on the integer kernel's AVX2 build (no VNNI), where a step of 4 rows costs ~2.4x one (VNNI's and
    AMX's ~1.3x, the float kernels' less: they read the weights, not multiply them, at a few rows), and int4-a8's
    kernel, an AVX2 build on every CPU."""
    from engine.models.w4a16_matmul import w4a16_kind

    used = formats.split("+")
    return "int4-a8" in used or ("int4" in used and int4_kernel_choice() == "auto" and w4a16_kind() == "AVX2")


def _head_kernel(model: torch.nn.Module, quantization: str, keep_4bit: bool) -> tuple[Kernel | None, str]:
    """The LM head's kernel: `auto` keeps an 8-bit (Q8_0) head in its codes where kvserve's kernel runs."""
    weight, grid = model.lm_head_weight, getattr(model, "lm_head_grid", None)
    model.lm_head_grid = None  # used here or never: its codes are not kept twice
    if keep_4bit and weight.device.type == "cpu" and weight.dtype == torch.float32 and q8_kernel_runs():
        grid = grid if grid is not None else eight_bit_groups(weight)
        if grid is not None:
            return q8_linear(grid), "q8_0"
    return make_kernel(weight, None, quantization, keep_4bit)


def vocab_projection(x: torch.Tensor, weight: torch.Tensor, kernel: Kernel | None) -> torch.Tensor:
    """x @ weight.T (the LM head), through the packed kernel when there is one."""
    if kernel is not None and x.device.type == "cpu":
        return kernel(x)
    return F.linear(x, weight)
