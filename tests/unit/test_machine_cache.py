"""Kernel measurements kept between starts: read back on the same machine and settings, measured again otherwise."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from engine import machine_cache
from engine.machine_cache import remembered


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KVSERVE_KERNEL_CACHE", str(tmp_path))
    machine_cache.measurements.forget()
    yield tmp_path
    machine_cache.measurements.forget()  # later tests read the real cache again


def counted(value: int, calls: list[str], delay: float = 0.0):
    def measure() -> int:
        calls.append("measured")
        time.sleep(delay)
        return value
    return measure


def test_a_measurement_is_read_back_by_a_later_start(cache: Path) -> None:
    calls: list[str] = []
    assert remembered("rows:a", counted(16, calls)) == 16
    assert remembered("rows:a", counted(99, calls)) == 16  # this process: asked once
    machine_cache.measurements.forget()  # as a new process would start
    assert remembered("rows:a", counted(99, calls)) == 16
    assert remembered("rows:b", counted(8, calls)) == 8
    assert calls == ["measured", "measured"]
    assert len(list(cache.glob("measurements-*.json"))) == 1


def test_other_dispatch_settings_measure_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    remembered("rows", counted(64, calls))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN would run other code: the old figure does not hold
    machine_cache.measurements.forget()
    assert remembered("rows", counted(8, calls)) == 8
    assert calls == ["measured", "measured"]
    assert len(list(cache.glob("measurements-*.json"))) == 2


def test_a_damaged_file_is_measured_again(cache: Path) -> None:
    remembered("rows", counted(64, []))
    (path,) = cache.glob("measurements-*.json")
    path.write_text('{"rows": 6')  # cut short
    machine_cache.measurements.forget()
    calls: list[str] = []
    assert remembered("rows", counted(32, calls)) == 32 and calls == ["measured"]


def test_threads_asking_together_measure_once(cache: Path) -> None:
    calls: list[str] = []
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(remembered("slow", counted(7, calls, 0.2))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    other = remembered("other", counted(3, calls))  # another name meanwhile
    for thread in threads:
        thread.join()
    assert results == [7] * 4 and other == 3 and calls.count("measured") == 2


def test_an_unwritable_cache_still_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVSERVE_KERNEL_CACHE", str(blocker / "sub"))  # a directory cannot be made under a file
    machine_cache.measurements.forget()
    try:
        assert remembered("rows", counted(16, [])) == 16
    finally:
        machine_cache.measurements.forget()
