"""kvserve's C++ CPU kernels (engine/csrc/*.cpp): built on first use into one library, loaded through ctypes.

The kernels are plain C++ with GCC vector types (AVX-512, AMX and AVX2 intrinsics in the matmuls), compiled for
this CPU (`-march=native`, or KVSERVE_KERNEL_MARCH's) by the system's g++ against the installed torch (for its
thread pool), a compiler per source at once (about 5 s on 2 cores), and cached in $KVSERVE_KERNEL_CACHE (default
~/.cache/kvserve/kernels), keyed by the sources, torch, the compiler, the CPU and the -march, so a second start
only loads them. Where there is no compiler, or the build fails, `load()` says why and each caller keeps its
PyTorch path. Each kernel's module declares its functions' C signatures with `function()`.

- csrc/paged_decode.cpp: decode attention over the paged KV cache (engine/paged_decode.py)
- csrc/rms_norm.cpp: RMSNorm, alone or after a residual add (engine/models/layers.py)
- csrc/elementwise.cpp: SwiGLU's silu(gate) * up and the residual add (engine/models/layers.py)
- csrc/rotary.cpp: rotary position embedding, PyTorch's bits in one call (engine/models/layers.py)
- csrc/int4_gemv.cpp: int4 matmuls over PyTorch's packed weights (engine/models/int4_matmul.py)
- csrc/w4a16_matmul.cpp: 4-bit layers' matmul in integers, on VNNI or AMX (engine/models/w4a16_matmul.py)
- csrc/q8_matmul.cpp: a Q8_0 LM head's matmul, llama.cpp's arithmetic on VNNI or AMX (engine/models/q8_matmul.py)
- csrc/integer_avx2.cpp: those two for CPUs with AVX2 but not AVX-512 VNNI, the same bits
- csrc/int8_rows.h: what the integer matmuls share
- csrc/vec.h: the vector types and helpers they share
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine.machine_cache import cache_dir, cpu_signature

SOURCES = tuple(sorted(Path(__file__).with_name("csrc").glob("*.cpp")))
HEADERS = tuple(sorted(Path(__file__).with_name("csrc").glob("*.h")))  # what the sources include


class KernelUnavailable(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


def _compiler() -> str:
    asked = os.environ.get("CXX")
    compiler = shutil.which(asked) if asked else shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelUnavailable(f"no C++ compiler {asked!r} found (CXX)" if asked else
                                "no C++ compiler found (install g++, or set CXX)")
    return compiler


def target_arch() -> str:
    """The -march the kernels are built for: this CPU's (native), or KVSERVE_KERNEL_MARCH's, e.g. x86-64-v3 (AVX2,
    FMA, F16C: what an AVX2-only CPU builds) to measure that CPU kind's kernels on a newer one."""
    return os.environ.get("KVSERVE_KERNEL_MARCH", "").strip() or "native"


def _compile_command(compiler: str, source: Path, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", f"-march={target_arch()}", "-std=c++17", "-fopenmp", "-fPIC", "-c",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", str(source), "-o", str(output)]


def _link_command(compiler: str, objects: list[Path], output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(output),
            # torch's own libraries (its OpenMP runtime included), so the kernels share torch's thread pool
            f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([*(source.read_text() for source in SOURCES + HEADERS), torch.__version__,
                                    str(Path(torch.__file__).parent), version, cpu_signature(),
                                    target_arch()]).encode())
    return cache_dir() / f"kvserve_kernels-{key.hexdigest()[:16]}.so"


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _build(compiler: str, library: Path) -> None:
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name, then renamed into place: processes starting together never load half a file.
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
            # One compiler per source, as many at once as there are cores: one after another they took ~9.5 s of
            # a first start on 2 cores, ~5.5 s so.
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                commands = [_compile_command(compiler, source, obj) for source, obj in zip(SOURCES, objects, strict=True)]
                compiled = list(pool.map(_run, commands))
            for source, done in zip(SOURCES, compiled, strict=True):
                if done.returncode != 0:
                    raise KernelUnavailable(f"building {source.name} failed:\n{done.stderr.strip()[-2000:]}")
            partial = Path(scratch) / library.name
            linked = _run(_link_command(compiler, objects, partial))
            if linked.returncode != 0:
                raise KernelUnavailable(f"linking the kernels failed:\n{linked.stderr.strip()[-2000:]}")
            os.replace(partial, library)
    except OSError as error:
        raise KernelUnavailable(f"cannot write the kernels to {library.parent} ({error}); set KVSERVE_KERNEL_CACHE "
                                "to a writable directory") from error


@functools.cache
def load() -> ctypes.CDLL:
    """The kernel library, built first where no cached build matches. Raises KernelUnavailable."""
    if platform.system() != "Linux":
        raise KernelUnavailable("the kernels are built and tested on Linux only")
    compiler = _compiler()
    library = _library_path(compiler)
    if not library.exists():
        _build(compiler, library)
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelUnavailable(f"loading {library} failed: {error}") from error


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None where they can (building them if needed)."""
    try:
        load()
    except KernelUnavailable as error:
        return str(error)
    return None


@functools.cache
def function(symbol: str, *argtypes: type) -> ctypes._CFuncPtr:
    """The library's C function `symbol` (returning void) taking `argtypes`. Raises KernelUnavailable."""
    fn = getattr(load(), symbol)
    fn.restype = None
    fn.argtypes = list(argtypes)
    fn.errcheck = _record_call  # set once, here: changing it while another thread calls fn would crash ctypes
    return fn


_recording = threading.local()


def _record_call(result, function, arguments):
    """ctypes calls it after each call of a kernel (`errcheck`), with the call's arguments: kept while this
    thread records (engine/decode_graph.py records a decode step this way); ~0.2 µs a call otherwise."""
    calls = getattr(_recording, "calls", None)
    if calls is not None:
        calls.append((function, arguments))
    return result


@contextlib.contextmanager
def recording_calls() -> Iterator[list[tuple[ctypes._CFuncPtr, tuple]]]:
    """The kernel calls this thread makes while the block runs, as (function, arguments), in order. Other
    threads' calls meanwhile are not in it."""
    _recording.calls = calls = []
    try:
        yield calls
    finally:
        _recording.calls = None


@functools.cache
def without_recording(symbol: str, *argtypes: type) -> ctypes._CFuncPtr:
    """The C function function(symbol, *argtypes) gives, as a ctypes object of its own that records nothing (a
    replay's calls)."""
    twin = ctypes.CFUNCTYPE(None, *argtypes)(ctypes.cast(function(symbol, *argtypes), ctypes.c_void_p).value)
    twin.__name__ = symbol
    return twin


# What the integer kernels' `<symbol>_supported()` answers (csrc/int8_rows.h, csrc/integer_avx2.cpp): how they
# multiply here.
INTEGER_KERNEL_KINDS = {1: "VNNI", 2: "VNNI, AMX from 8 rows", 3: "AVX2"}
# The integer kernels' builds, best first: each kernel has a VNNI one (`symbol`) and an AVX2 one (`symbol_avx2`)
# giving the same bits.
INTEGER_ISAS = ("vnni", "avx2")


@functools.cache
def integer_kernel(symbol: str, *argtypes: type, isa: str | None = None) -> tuple[ctypes._CFuncPtr | None, str | None]:
    """An integer kernel's C function and how it multiplies here, or (None, None) where it does not run (neither
    AVX-512 VNNI nor AVX2, or the kernels cannot be built). `isa` ("vnni" or "avx2") asks for that build, else the
    best one here runs."""
    try:
        for name in (isa,) if isa else INTEGER_ISAS:
            build = symbol if name == "vnni" else f"{symbol}_{name}"
            kind = INTEGER_KERNEL_KINDS.get(getattr(load(), f"{build}_supported")())
            if kind:
                return function(build, *argtypes), kind
        return None, None
    except KernelUnavailable:
        return None, None
