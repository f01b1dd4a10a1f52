"""The CPU KV cache's memory: zeros at once, resident only once asked, and never changed by becoming resident."""

from __future__ import annotations

import errno
import mmap
import subprocess
import sys

import pytest
import torch

from engine import resident_memory
from engine.resident_memory import lazy_zeros, make_resident

MIB = 1 << 20


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def kernel_populates() -> bool:
    """Whether this kernel backs memory on request (MADV_POPULATE_WRITE, Linux 5.14+)."""
    probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    tensor = torch.frombuffer(probe, dtype=torch.uint8)
    return resident_memory._populate(tensor.data_ptr(), mmap.PAGESIZE) == 0


def test_lazy_zeros_are_zeros_of_the_shape_and_dtype_asked() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tensor = lazy_zeros((2, 3, 5, 16, 4), dtype)
        assert tensor.shape == (2, 3, 5, 16, 4) and tensor.dtype == dtype and tensor.is_contiguous()
        assert torch.count_nonzero(tensor) == 0
        tensor[1, 2, 4, 15, 3] = 7  # writable, to its last element
        assert tensor.sum().item() == 7
    assert lazy_zeros((0, 4), torch.float32).shape == (0, 4)


@pytest.mark.skipif(not kernel_populates(), reason="this kernel cannot populate memory on request (Linux < 5.14)")
def test_memory_becomes_resident_when_asked_and_keeps_what_was_written() -> None:
    size = 256 * MIB
    before = rss_mib()
    tensor = lazy_zeros((size // 4,), torch.float32)
    assert rss_mib() - before < 32  # mapped, not yet backed
    tensor[:1024] = 1.5  # a request's KV written before and while it becomes resident
    tensor[-1] = -2.0
    make_resident(tensor).join()
    assert rss_mib() - before > 0.9 * size / MIB
    assert torch.all(tensor[:1024] == 1.5) and tensor[-1].item() == -2.0
    assert torch.count_nonzero(tensor[1024:-1]) == 0


def test_a_kernel_that_cannot_populate_gets_the_zeros_written_at_once(monkeypatch) -> None:
    monkeypatch.setattr(resident_memory, "_populate", lambda address, length: errno.EINVAL)
    before = rss_mib()
    tensor = lazy_zeros((64 * MIB // 4,), torch.float32)
    assert rss_mib() - before > 60  # written, so resident: as torch.zeros was
    assert torch.count_nonzero(tensor) == 0


@pytest.mark.skipif(not kernel_populates(), reason="this kernel cannot populate memory on request (Linux < 5.14)")
def test_an_engine_s_kv_cache_is_resident_once_asked_and_serves_the_same_tokens(tmp_path) -> None:
    from helpers.tiny_engine import make_tiny_model_dir

    from engine import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    path = make_tiny_model_dir(tmp_path)
    before = rss_mib()
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=192 * MIB)  # made resident in the background
    first = llm.generate([[1, 2, 3, 4, 5]], greedy)[0].outputs[0].token_ids
    resident = llm.engine.make_kv_cache_resident()  # again: a no-op over pages already backed
    assert resident is not None
    resident.join()
    assert rss_mib() - before > 180
    assert llm.generate([[1, 2, 3, 4, 5]], greedy)[0].outputs[0].token_ids == first


@pytest.mark.skipif(not kernel_populates(), reason="this kernel cannot populate memory on request (Linux < 5.14)")
def test_stop_populating_ends_the_thread_after_its_slice_and_leaves_the_contents() -> None:
    size = 2048 * MIB  # seconds to populate on a 2-core VM, so the stop comes well before the end
    before = rss_mib()
    tensor = lazy_zeros((size // 4,), torch.float32)
    tensor[-1] = 3.0
    thread = make_resident(tensor)
    resident_memory.stop_populating()  # what runs at exit
    assert not thread.is_alive() and thread not in resident_memory._populating
    assert rss_mib() - before < 0.5 * size / MIB  # stopped part way
    assert tensor[-1].item() == 3.0 and torch.count_nonzero(tensor[:-1]) == 0


EXIT_WHILE_POPULATING = """
import torch
from engine.resident_memory import lazy_zeros, make_resident
tensor = lazy_zeros((512 << 20,), torch.float32)  # 2 GiB
make_resident(tensor)
del tensor  # the thread holds the last reference, as it does for `kvserve generate`'s cache at exit
print("exiting", flush=True)
"""


@pytest.mark.skipif(not kernel_populates(), reason="this kernel cannot populate memory on request (Linux < 5.14)")
def test_a_process_exiting_while_its_cache_becomes_resident_exits_cleanly() -> None:
    # Before stop_populating, the thread dropped the tensor during the interpreter's finalization and the process
    # could abort ("terminate called without an active exception"); now it is stopped and joined first.
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXIT_WHILE_POPULATING], capture_output=True, text=True,
                              timeout=120)
        assert (done.returncode, done.stdout, done.stderr) == (0, "exiting\n", "")
