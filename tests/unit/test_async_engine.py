"""AsyncEngine.launch and the server's start_loading: the engine is built on its step-loop thread, and build
errors reach the caller."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers.tiny_engine import make_tiny_model_dir

from engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def config() -> EngineConfig:
    return EngineConfig(device="cpu", dtype="float32", block_size=4, kv_cache_bytes=4 << 20)


def test_launch_builds_on_the_step_thread_and_serves(tiny_dir: str) -> None:
    threads: dict[str, set[threading.Thread]] = {"build": set(), "step": set()}

    def build() -> LLMEngine:
        threads["build"].add(threading.current_thread())
        return LLMEngine(tiny_dir, config(), progress=False)

    async_engine = AsyncEngine.launch(build, on_step=lambda _: threads["step"].add(threading.current_thread()))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def consume() -> list[int]:
        async for out in async_engine.generate("r1", [5, 6, 7, 8], params):
            if out.finished:
                return out.outputs[0].token_ids
        return []

    try:
        got = asyncio.run(consume())
    finally:
        asyncio.run(async_engine.shutdown())
    reference = LLMEngine(tiny_dir, config(), progress=False)
    reference.add_request("alone", [5, 6, 7, 8], params)
    expected = []
    while reference.has_unfinished():
        expected = [o.outputs[0].token_ids for o in reference.step() if o.finished] or expected
    assert got == expected[0]
    assert threads["build"] == threads["step"]  # one thread both built and stepped the engine
    assert threading.current_thread() not in threads["build"]
    assert not async_engine.is_alive


def test_launch_raises_the_build_error(tiny_dir: str) -> None:
    def build() -> LLMEngine:
        raise ValueError("no such model")

    before = threading.active_count()
    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.launch(build)
    for thread in threading.enumerate():
        if thread.name == "kvserve-engine":
            thread.join(5)
    assert threading.active_count() == before


def test_a_load_given_up_before_it_started_builds_nothing(tiny_dir: str) -> None:
    built: Future[AsyncEngine] = Future()
    built.cancel()  # the server stopped while the engine thread was still importing
    calls: list[str] = []
    AsyncEngine.build_then_run(lambda: calls.append("built") or LLMEngine(tiny_dir, config(), progress=False), built)
    assert calls == []


def test_start_loading_builds_on_its_own_thread_and_reports_errors(tiny_dir: str) -> None:
    from service.loading import start_loading
    from service.settings import Settings

    engine = start_loading(Settings(model=tiny_dir, quantization="none", kv_cache_bytes=4 << 20)).result(120)
    try:
        assert engine.is_alive and engine._thread is not threading.current_thread()
        assert engine._thread.name == "kvserve-engine"  # the thread that built it steps it
    finally:
        asyncio.run(engine.shutdown())
    failed = start_loading(Settings(model=str(Path(tiny_dir) / "missing")))
    with pytest.raises(ValueError, match="neither an existing path"):
        failed.result(120)
