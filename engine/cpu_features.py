"""The CPU features that decide which matmul formats run here: detected once, in this one place.

The engine (models/cpu_matmul.py picks and refuses formats from these), the tests (their expectations)
and CI's log (`kvserve cpu-features`) all ask this module, so they cannot disagree.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    amx: bool  # AMX tiles (Intel Sapphire Rapids and later): bf16 GEMMs on matrix tiles
    avx512_bf16: bool  # native bf16 dot products, which oneDNN's bf16 GEMM needs (else it emulates them)
    vnni: bool  # int8 dot products (AVX-512 VNNI or AVX-VNNI): fbgemm's faster int8 path
    avx2: bool
    fbgemm: bool  # PyTorch's fbgemm backend (x86 builds): the fp16 and int8 kernels

    def describe(self) -> str:
        """One line: the features present and absent, e.g. 'avx2 avx512_bf16 vnni fbgemm, no amx'."""
        names = [name for name, value in asdict(self).items() if value]
        missing = [name for name, value in asdict(self).items() if not value]
        return " ".join(names or ["none"]) + (f", no {' '.join(missing)}" if missing else "")


@functools.cache
def detect() -> CpuFeatures:
    """This CPU's features, as PyTorch (cpuinfo) and its oneDNN build see them."""
    onednn = torch.backends.mkldnn.is_available()
    return CpuFeatures(
        amx=torch.cpu._is_amx_tile_supported(),
        avx512_bf16=onednn and torch.cpu._is_avx512_bf16_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        vnni=torch.cpu._is_vnni_supported(),
        avx2=torch.cpu._is_avx2_supported(),
        fbgemm="fbgemm" in torch.backends.quantized.supported_engines,
    )


def report(features: CpuFeatures | None = None) -> str:
    """What `kvserve cpu-features` prints: the features, the format `auto` picks, and each format offered or not."""
    from engine.models.cpu_matmul import (
        FORMATS,
        format_refusal,
        keeps_4bit,
        resolve_quantization,
        rows_cost_arithmetic,
    )
    from engine.models.int4_matmul import int4_kernel_choice, native_kernel_reason
    from engine.models.q8_matmul import q8_kernel_kind
    from engine.models.w4a16_matmul import w4a8_kernel, w4a16_kind
    from engine.speculative import NgramConfig, for_kernels

    features = features or detect()
    default = resolve_quantization('auto', 'cpu', torch.float32, features)
    if keeps_4bit("auto", "cpu", torch.float32, features):
        default = f"int4 for weights stored in 4 bits (Q4_0/Q4_1/Q4_K GGUF tensors), {default} for the rest"
    lines = [f"CPU features: {features.describe()}", f"default CPU format (--quantization auto): {default}"]
    flags = [(f"--quantization {name}", name) for name in FORMATS] + [("--dtype bfloat16", "bf16")]
    for flag, name in flags:
        reason = format_refusal(name, features)
        lines.append(f"{flag}: {'offered' if reason is None else 'refused: ' + reason}")
    if format_refusal("int4", features) is None and features == detect():  # asks this machine's torch and kernels
        why = native_kernel_reason()
        if int4_kernel_choice() == "auto" and (integer := w4a16_kind()):
            lines.append(f"int4 matmuls: kvserve's integer kernel (rows to 16 bits per group of 32; {integer})")
        else:
            lines.append("int4 matmuls: " + ("kvserve's bf16 kernel (PyTorch's results bit for bit, faster)"
                                             if why is None else f"PyTorch's kernel ({why})"))
        if format_refusal("int4-a8", features) is None and w4a8_kernel() is not None:
            lines.append("int4-a8 matmuls (--quantization int4-a8): kvserve's integer kernel (rows to 8 bits per group "
                         "of 32; its AVX2 build on every CPU)")
        kind = q8_kernel_kind()
        lines.append("a Q8_0 LM head (auto): " + (f"kvserve's 8-bit kernel ({kind})" if kind
                                                  else "the float format (kvserve's 8-bit kernel needs AVX-512 VNNI or AVX2)"))
        drafts = for_kernels(NgramConfig(), rows_cost_arithmetic("int4")).num_speculative_tokens
        lines.append(f"n-gram speculation (default, a 4-bit GGUF): up to {drafts} draft(s) a step"
                     + (" (each extra row costs its arithmetic on the AVX2 build)" if drafts == 1 else ""))
    return "\n".join(lines)
