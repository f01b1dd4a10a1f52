"""What kvserve keeps about this machine between starts: its compiled kernel and its kernels' measured traits.

Both hold only for the CPU, the torch build and the settings they were made under, so both are keyed by
them, and both live in $KVSERVE_KERNEL_CACHE (default ~/.cache/kvserve/kernels). Deleting the folder only
costs the next start the time to build and measure again.

Measurements: packing a model measures, once per weight shape, how many rows a matmul call may hold before
oneDNN or PyTorch's int4 kernel rounds a row by its neighbours (models/cpu_matmul.py). For SmolLM2's
49152-row LM head that is a few hundred calls, about a second of every cold start; remembered here, a
second start reads one small JSON file instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("kvserve.engine")
# Settings that change which code oneDNN, fbgemm or ATen run, and with it what a measurement finds.
_DISPATCH_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_DEFAULT_FPMATH_MODE")


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "kvserve" / "kernels"
    return Path(os.environ.get("KVSERVE_KERNEL_CACHE") or default).expanduser()


def cpu_signature() -> str:
    """What -march=native compiles for and what kernels dispatch on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(dict.fromkeys(line for line in lines if line.split(":")[0].strip() in wanted))


def _measurements_path() -> Path:
    settings = [f"{name}={os.environ.get(name, '')}" for name in _DISPATCH_SETTINGS]
    key = hashlib.sha256("\0".join([torch.__version__, str(Path(torch.__file__).parent), cpu_signature(),
                                    *settings]).encode()).hexdigest()[:16]
    return cache_dir() / f"measurements-{key}.json"


class _Measurements:
    """name -> int, read from disk once, each name measured at most once per process (threads wait on it)."""

    def __init__(self) -> None:
        self._values: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    def get(self, name: str, measure: Callable[[], int]) -> int:
        with self._lock:
            if self._values is None:
                self._values = self._read()
            name_lock = self._name_locks.setdefault(name, threading.Lock())
        with name_lock:  # one lock per name: a slow measurement holds up only the threads that need its value
            if name in self._values:
                return self._values[name]
            value = measure()
            with self._lock:
                self._values[name] = value
                self._write({**self._read(), **self._values})  # keeps what other processes added meanwhile
            return value

    def forget(self) -> None:
        """Drop what this process knows (tests: measure again, or read another cache)."""
        with self._lock:
            self._values = None
            self._name_locks.clear()

    @staticmethod
    def _read() -> dict[str, int]:
        try:
            values = json.loads(_measurements_path().read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(values, dict):
            return {}
        return {name: value for name, value in values.items() if isinstance(value, int)}

    @staticmethod
    def _write(values: dict[str, int]) -> None:
        """Best effort, atomically: a read-only cache only costs the next start its measuring."""
        path = _measurements_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".partial-", delete=False) as out:
                json.dump(values, out, sort_keys=True)
            os.replace(out.name, path)
        except OSError as error:
            log.debug("could not keep kernel measurements in %s: %s", path.parent, error)


measurements = _Measurements()


def remembered(name: str, measure: Callable[[], int]) -> int:
    """measure(), or what it returned on this machine before (same CPU, torch and dispatch settings)."""
    return measurements.get(name, measure)
