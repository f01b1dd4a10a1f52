"""What the integer matmul tests share (test_q8_matmul.py, test_w4a16_matmul.py): the instruction sets the kernels
are built for (AVX-512 VNNI, else AVX2), rows of mixed scales, and the rows' 16-bit quantization they apply."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch

from engine import native

GROUP = 32


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _built_flags() -> set[str]:
    """This CPU's flags, or under KVSERVE_KERNEL_MARCH those its -march enables (as /proc/cpuinfo names them)."""
    if native.target_arch() == "native":
        return cpu_flags()
    compiler = os.environ.get("CXX") or shutil.which("g++") or "c++"
    macros = subprocess.run([compiler, f"-march={native.target_arch()}", "-dM", "-E", "-x", "c++", "/dev/null"],
                            capture_output=True, text=True, check=True).stdout
    names = {"__AVX512F__": "avx512f", "__AVX512VNNI__": "avx512_vnni", "__AMX_TILE__": "amx_tile",
             "__AMX_INT8__": "amx_int8", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c"}
    return {flag for macro, flag in names.items() if f"#define {macro} " in macros} & cpu_flags()


FLAGS = _built_flags()
VNNI = {"avx512f", "avx512_vnni"} <= FLAGS  # what the kernels are built for (-march=native)
AMX = {"amx_tile", "amx_int8"} <= FLAGS
AVX2 = {"avx2", "fma", "f16c"} <= FLAGS  # csrc/integer_avx2.cpp: the same kernels without VNNI
# The builds of the integer kernels this CPU runs (native.integer_kernel's isa), each tested on its own
ISAS = [isa for isa, present in (("vnni", VNNI), ("avx2", AVX2)) if present]
# How the kernel picked by default multiplies here
KIND = ("VNNI, AMX from 8 rows" if AMX else "VNNI") if VNNI else "AVX2" if AVX2 else None


def rows(count: int, in_features: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(count, in_features, generator=torch.Generator().manual_seed(seed))
    x[::2] *= 50.0  # rows of very different scale
    return x


def sixteen_bit_rows(x: torch.Tensor) -> torch.Tensor:
    """x quantized to 16 bits per group of 32 (scale = max |x| / 32767, in fp32 as the kernels) and back, in float64."""
    groups = x.double().reshape(x.shape[0], -1, GROUP)
    scale = (groups.abs().amax(-1, keepdim=True).float() / 32767).double()
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0)).clamp(-32767, 32767)
    return (q * scale).reshape(x.shape)


def eight_bit_rows(x: torch.Tensor) -> torch.Tensor:
    """x quantized to 8 bits per group of 32 (scale = max |x| / 127) and back, in float64: the division and its
    rounding to nearest even in fp32, as the kernel does them."""
    groups = x.float().reshape(x.shape[0], -1, GROUP)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0))
    return (q.double() * scale.double()).reshape(x.shape)


def assert_rows_alone_equal_batched(linear, x: torch.Tensor, counts: tuple[int, ...]) -> None:
    """Every row of x through `linear` alone, then in calls of each of `counts` rows: the same bits each time."""
    alone = torch.cat([linear(row) for row in x.split(1)])
    for count in counts:
        assert torch.equal(torch.cat([linear(part) for part in x.split(count)]), alone), count


def assert_non_finite_poisons_only_its_row(linear, in_features: int, counts: tuple[int, ...], column: int,
                                           bad: float) -> None:
    """For each batch size: `bad` (inf or NaN) put in the middle row's `column` makes that row's outputs all NaN,
    and every other row keeps the bits it had without it."""
    for count in counts:
        x = rows(count, in_features, seed=count)
        clean = linear(x)
        x[count // 2, column] = bad
        got = linear(x)
        assert got[count // 2].isnan().all(), count
        keep = torch.arange(count) != count // 2
        assert torch.equal(got[keep], clean[keep]), count
