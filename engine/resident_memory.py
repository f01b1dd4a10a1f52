"""The CPU KV cache's memory: zeros at once, resident a moment later, off the start's critical path.

Written with torch.zeros, the default 1 GiB cache cost a start 0.3 s on a 2-core VM, nearly all of it page
faults. `lazy_zeros` instead maps fresh anonymous memory, which the kernel hands out zeroed; after warm-up
`make_resident` has a background thread ask the kernel to back every page (madvise MADV_POPULATE_WRITE,
Linux 5.14+). That call faults pages in and never changes what they hold, so requests may write KV blocks
meanwhile; ctypes lets go of the GIL for it. It runs after warm-up because while the engine packs its weights
the two fight over page faults: packing then took 0.5 s instead of 0.16 s (2-core Zen 4 VM).

Why resident at all rather than mapped as requests first touch it: lazily mapped, a server's resident memory
grew by up to the whole cache over its first hours, a block at a time, as the prefix cache's LRU order handed
out fresh blocks; made resident at start, it is within a second of readiness what it will stay, and a
container too small for the cache fails then. Where the kernel cannot populate (older than 5.14, or not
Linux), `lazy_zeros` writes the zeros itself, as before.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import math
import mmap
import os
import threading
import time

import torch

log = logging.getLogger("kvserve.engine")

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value; Python names it from 3.12 on
# Populated a slice at a time: one call over the whole cache holds the process's memory map for its length,
# and the engine's own allocations would wait on it.
SLICE_BYTES = 8 << 20
_CANNOT_POPULATE = (errno.EINVAL, errno.ENOSYS)  # a kernel older than 5.14, or no libc madvise


@functools.cache
def _madvise():
    """libc's madvise, called without the GIL (ctypes releases it), or None."""
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def _populate(address: int, length: int) -> int:
    """0, or the errno of the kernel's refusal to back [address, address + length)."""
    madvise = _madvise()
    if madvise is None:
        return errno.ENOSYS
    return 0 if madvise(address, length, MADV_POPULATE_WRITE) == 0 else ctypes.get_errno()


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor whose pages are not yet resident (see make_resident), where the kernel can
    populate them later; elsewhere torch.zeros."""
    numel = math.prod(shape)
    length = numel * dtype.itemsize
    if length == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)  # keeps `mapping` alive
    # One page here: a kernel that cannot populate says so now, and the zeros are written instead.
    if (err := _populate(tensor.data_ptr(), min(length, mmap.PAGESIZE))) != 0:
        if err not in _CANNOT_POPULATE:
            raise MemoryError(f"{length} bytes of KV cache could not be made resident: {errno.errorcode.get(err)}")
        tensor.zero_()  # already zeros: writing them faults every page in
    return tensor


# The populating threads, each with the event that stops it (stop_populating, at exit). A thread stays here until
# joined: after its loop it still lets go of its tensor (Thread.run drops its arguments).
_populating: dict[threading.Thread, threading.Event] = {}


def make_resident(tensor: torch.Tensor) -> threading.Thread:
    """Back every page of a CPU tensor on a background thread (a no-op for pages already resident).

    The thread holds the tensor until it is done, so the memory stays mapped even if its owner lets go; at
    exit it is stopped first (stop_populating).
    """
    length = tensor.untyped_storage().nbytes()
    stop = threading.Event()

    for finished in [t for t in _populating if not t.is_alive()]:
        del _populating[finished]
    thread = threading.Thread(target=_populate_slices, args=(tensor, length, stop), name="kvserve-kv-resident",
                              daemon=True)
    _populating[thread] = stop
    thread.start()
    return thread


def _populate_slices(tensor: torch.Tensor, length: int, stop: threading.Event) -> None:
    # At the lowest priority: the first requests, which may come in meanwhile, go first for the cores.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    start = time.perf_counter()
    for offset in range(0, length, SLICE_BYTES):
        if stop.is_set():
            return
        if (err := _populate(tensor.data_ptr() + offset, min(SLICE_BYTES, length - offset))) != 0:
            if err in _CANNOT_POPULATE:  # lazy_zeros wrote the zeros, so every page is resident already
                return
            log.error("the KV cache could not be made resident", extra={"fields": {
                "bytes": length, "errno": errno.errorcode.get(err, err)}})
            return
    log.info("KV cache resident", extra={"fields": {"bytes": length,
                                                    "seconds": round(time.perf_counter() - start, 3)}})


@atexit.register
def stop_populating() -> None:
    """Stop every populating thread (after its current slice, ~8 MB) and wait for it.

    Run at exit, before the interpreter finalizes: a daemon thread still running then could drop the last
    reference to its tensor after finalization began, and freeing a torch.frombuffer tensor there needs the GIL,
    which a daemon thread then never gets (CPython ends it inside torch's C++ deleter, and the process aborted
    with "terminate called without an active exception": `kvserve generate --max-tokens 1` in about 1 run of
    40, seen in a core dump).
    """
    threads = list(_populating.items())
    for _, stop in threads:
        stop.set()
    for thread, _ in threads:
        thread.join()  # until the thread has ended, its tensor released
        _populating.pop(thread, None)
