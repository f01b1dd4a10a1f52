"""kvserve's CPU decode-attention kernel (csrc/paged_decode.cpp): built on first use, loaded through ctypes.

Decode attention reads each sequence's keys where they lie in the paged cache; the default path before it
(engine/attention.py: gather the blocks, then PyTorch's SDPA) copied the whole context once per layer and
step and, for some head shapes, rounded a row by its batch. Here every row is computed alone and in a
fixed order, so a request's output never depends on its batch, on any thread count.

The kernel is plain C++ with GCC vector types, compiled for this CPU (`-march=native`) by the system's g++
against the installed torch (for its thread pool) in under a second, and cached in $KVSERVE_KERNEL_CACHE
(default ~/.cache/kvserve/kernels), keyed by the source, torch, the compiler and the CPU, so a second
start only loads it. Where there is no compiler, or the build fails, `load()` says why and the engine keeps
the gather + SDPA path (`attention_backend="native"` makes that an error instead). It reads fp32 caches (CPU
fp32 models, the default) and bf16 ones (--dtype bfloat16), computing in fp32 either way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.machine_cache import cache_dir, cpu_signature

if TYPE_CHECKING:
    from engine.attention import AttentionSpec

SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
_SYMBOLS = {torch.float32: "kvserve_paged_decode_f32", torch.bfloat16: "kvserve_paged_decode_bf16"}  # by cache dtype


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def _compiler() -> str:
    asked = os.environ.get("CXX")
    compiler = shutil.which(asked) if asked else shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelUnavailable(f"no C++ compiler {asked!r} found (CXX)" if asked else
                                "no C++ compiler found (install g++, or set CXX)")
    return compiler


def _build_command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", str(SOURCE), "-o", str(output),
            # torch's own libraries (its OpenMP runtime included), so the kernel shares torch's thread pool
            f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), torch.__version__, str(Path(torch.__file__).parent),
                                    version, cpu_signature()]).encode()).hexdigest()[:16]
    return cache_dir() / f"paged_decode-{key}.so"


def _build(compiler: str, library: Path) -> None:
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name, then renamed into place: processes starting together never load half a file.
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            partial = Path(scratch) / library.name
            done = subprocess.run(_build_command(compiler, partial), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise KernelUnavailable(f"building {SOURCE.name} failed:\n{done.stderr.strip()[-2000:]}")
            os.replace(partial, library)
    except OSError as error:
        raise KernelUnavailable(f"cannot write the kernel to {library.parent} ({error}); set KVSERVE_KERNEL_CACHE "
                                "to a writable directory") from error


@functools.cache
def load() -> ctypes.CDLL:
    """The kernel library, built first where no cached build matches. Raises KernelUnavailable."""
    if platform.system() != "Linux":
        raise KernelUnavailable("the kernel is built and tested on Linux only")
    compiler = _compiler()
    library = _library_path(compiler)
    if not library.exists():
        _build(compiler, library)
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelUnavailable(f"loading {library} failed: {error}") from error
    for symbol in _SYMBOLS.values():
        fn = getattr(lib, symbol)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64, ctypes.c_float]
    return lib


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None where it can (building it if needed)."""
    try:
        load()
    except KernelUnavailable as error:
        return str(error)
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a KV cache of this device and dtype is one the kernel reads: CPU, fp32 or bf16."""
    return device.type == "cpu" and dtype in _SYMBOLS


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """q (rows, heads, D) -> (rows, heads, D): each row attends to keys 0..context_lens[row]-1 of its table.

    k_cache/v_cache (blocks, block_size, kv_heads, D) fp32 or bf16, block_tables (rows, max_blocks) int32
    (negative: a block given back, skipped), context_lens (rows,) int32; all contiguous CPU tensors. The
    math is fp32 whatever the cache holds; the result comes back in q's dtype.
    """
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    q32 = q.float().contiguous()
    out = torch.empty_like(q32)
    getattr(load(), _SYMBOLS[k_cache.dtype])(
        out.data_ptr(), q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), rows, heads, kv_heads, head_dim, block_size, block_tables.shape[1],
        spec.scale, spec.window or 0, spec.softcap or 0.0)
    return out.to(q.dtype)


BACKENDS = ("auto", "native", "sdpa")


def use_native(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether decode attention runs on the kernel, and why not where `auto` falls back to gather + SDPA.

    'sdpa' never uses it, 'native' must (ValueError where it cannot), 'auto' uses it wherever it can.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "sdpa":
        return False, None
    reason = None if supports(device, dtype) else f"it reads fp32 and bf16 KV caches on CPU, not {dtype} on {device.type}"
    reason = reason or unavailable_reason()
    if reason and backend == "native":
        raise ValueError(f"attention_backend=native: {reason}")
    return reason is None, reason
