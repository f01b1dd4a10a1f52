"""The benchmarks' pure parts: statistics, tables, prompt sets, and the OpenAI client on a fake local server."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch

from bench.cold_start import time_to_first_byte, time_to_first_served_token
from bench.common import markdown_table, parse_int_list, percentile, random_prompt_ids, summarize
from bench.decode_speed import common_prefix, speeds
from bench.hf_peer import left_padded
from bench.offline_throughput import run_openai, throughput_table
from bench.openai_client import (
    RequestResult,
    base_url_of,
    complete,
    completion_body,
    make_client,
    sse_data,
    stream_completion,
)
from bench.peers import parse_vllm_bench
from bench.serve_bench import aggregate, levels_from, run_bench, run_level

# --- statistics and formatting ---


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    rng = np.random.default_rng(int(q))
    for size in (1, 2, 7, 100):
        values = rng.exponential(size=size).tolist()
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    stats = summarize([1.0, 2.0, 3.0, 10.0])
    assert stats["mean"] == 4.0
    assert stats["p50"] == 2.5
    assert stats["p99"] == pytest.approx(float(np.percentile([1, 2, 3, 10], 99)))
    assert all(math.isnan(v) for v in summarize([]).values())


def test_markdown_table_and_int_lists() -> None:
    table = markdown_table(["a", "b"], [[1, "x"], [2, "y"]]).splitlines()
    assert table == ["| a | b |", "|---|---|", "| 1 | x |", "| 2 | y |"]
    assert parse_int_list("1,16, 64") == [1, 16, 64]
    for bad in ("", "a,b", "0,1"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


def test_random_prompts_are_reproducible_and_avoid_special_ids() -> None:
    first = random_prompt_ids(4, 50, vocab_size=10, seed=3, avoid=[0, 1, 2])
    assert first == random_prompt_ids(4, 50, vocab_size=10, seed=3, avoid=[0, 1, 2])
    assert first != random_prompt_ids(4, 50, vocab_size=10, seed=4, avoid=[0, 1, 2])
    assert all(len(p) == 50 and all(3 <= t < 10 for t in p) for p in first)


def test_throughput_table_ratios() -> None:
    systems = {"kvserve": {"1": {"tok_s": 40.0}, "16": {"tok_s": 300.0}},
               "vllm": {"1": {"tok_s": 20.0}, "16": {"tok_s": 150.0}},
               "llama": {"1": {"tok_s": 80.0}}}
    rows = throughput_table(systems, [1, 16]).splitlines()
    assert rows[0] == "| batch | kvserve tok/s | vllm tok/s | llama tok/s | kvserve/vllm | kvserve/llama |"
    assert rows[2] == "| 1 | 40.0 | 20.0 | 80.0 | 2.00× | 0.50× |"
    assert rows[3] == "| 16 | 300.0 | 150.0 | - | 2.00× | - |"


def test_aggregate_level() -> None:
    results = [RequestResult(ok=True, output_tokens=10, ttft=0.1, e2e=1.0, itls=[0.1] * 9),
               RequestResult(ok=True, output_tokens=30, ttft=0.3, e2e=2.0, itls=[0.05] * 29),
               RequestResult(ok=False, error="HTTP 500: boom")]
    level = aggregate(results, duration=4.0, concurrency=2)
    assert (level["requests"], level["failed"], level["errors"]) == (3, 1, ["HTTP 500: boom"])
    assert level["output_tokens"] == 40 and level["output_tok_s"] == 10.0
    assert level["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert level["itl_ms"]["p50"] == pytest.approx(50.0)  # 29 of the 38 gaps are 50 ms
    assert level["tpot_ms"]["mean"] == pytest.approx((900 / 9 + 1700 / 29) / 2)
    assert level["e2e_s"]["p99"] == pytest.approx(1.99)


def test_levels_from() -> None:
    assert levels_from([1, 16], [8]) == [(1, 8), (16, 8)]
    assert levels_from([1, 16], [8, 32]) == [(1, 8), (16, 32)]
    with pytest.raises(ValueError):
        levels_from([1, 16, 64], [8, 32])


def test_small_helpers() -> None:
    assert base_url_of("http://h:1/v1/") == "http://h:1" and base_url_of("http://h:1") == "http://h:1"
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and common_prefix([1], []) == 0
    assert speeds(11, wall=2.0, first_token=0.5, last_token=1.5) == {"decode_tok_s": 10.0, "e2e_tok_s": 5.5,
                                                                    "ttft_s": 0.5}
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))


def test_parse_vllm_bench_summary() -> None:
    text = """============ Serving Benchmark Result ============
Output token throughput (tok/s):          291.35
Median TTFT (ms):                         120.50
P99 TTFT (ms):                            900.00
Median ITL (ms):                          45.10
P99 ITL (ms):                             80.70
"""
    assert parse_vllm_bench(text) == {"output_tok_s": 291.35, "ttft_p50_ms": 120.5, "ttft_p99_ms": 900.0,
                                      "itl_p50_ms": 45.1, "itl_p99_ms": 80.7}


def test_time_to_first_byte_comes_before_exit() -> None:
    cmd = [sys.executable, "-c", "import sys, time; sys.stdout.write('x'); sys.stdout.flush(); time.sleep(0.3)"]
    first, total = time_to_first_byte(cmd)
    assert 0 < first < total
    with pytest.raises(RuntimeError):
        time_to_first_byte([sys.executable, "-c", "raise SystemExit(3)"])


_SLOW_SERVER = """
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
time.sleep(0.3)
started = time.monotonic()
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        ready = time.monotonic() - started > 0.2  # 503 while "loading", as kvserve answers before /ready
        self.send_response(200 if ready else 503); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_time_to_first_served_token_waits_for_a_200_then_stops_the_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seconds, _ = time_to_first_served_token([sys.executable, "-c", _SLOW_SERVER, str(port)], port, "hi")
    assert seconds >= 0.5  # 0.3 s before listening, then 0.2 s of 503s
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={})
    with pytest.raises(RuntimeError, match="exited with 3"):
        time_to_first_served_token([sys.executable, "-c", "raise SystemExit(3)"], port, "hi")


# --- the OpenAI client against a fake server ---

def test_sse_data_keeps_only_data_payloads() -> None:
    lines = [": keep-alive", "", "event: x", 'data: {"a": 1}', "data:[DONE]"]
    assert list(sse_data(lines)) == ['{"a": 1}', "[DONE]"]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions; one token per chunk, word i is "t{i} "; prompt "fail" gets a 400."""

    send_usage = True
    lock = threading.Lock()
    in_flight = 0
    max_in_flight = 0

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "fail":
            self._json(400, {"error": {"message": "bad prompt"}})
            return
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            words = [f"t{i} " for i in range(body["max_tokens"])]
            usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
            if not body.get("stream"):
                time.sleep(0.02)
                self._json(200, {"choices": [{"index": 0, "text": "".join(words), "finish_reason": "length"}],
                                 "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunks = [{"choices": [{"index": 0, "text": ""}]}]  # a role-like chunk with no token in it
            chunks += [{"choices": [{"index": 0, "text": w, "finish_reason": None}]} for w in words]
            if cls.send_usage and body.get("stream_options", {}).get("include_usage"):
                chunks.append({"choices": [], "usage": usage})
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.005)
            self.wfile.write(b"data: [DONE]\n\n")
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture()
def fake_server() -> Iterator[tuple[str, type[_FakeOpenAI]]]:
    handler = type("Handler", (_FakeOpenAI,), {"lock": threading.Lock(), "in_flight": 0, "max_in_flight": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


async def _stream(url: str, prompt: str | list[int], max_tokens: int) -> RequestResult:
    async with make_client(2) as client:
        body = completion_body("fake-model", prompt, max_tokens, stream=True)
        return await stream_completion(client, f"{url}/v1/completions", body)


def test_stream_completion_times_every_token(fake_server) -> None:
    url, _ = fake_server
    result = asyncio.run(_stream(url, [1, 2, 3], 5))
    assert result.ok and result.error == ""
    assert result.text == "t0 t1 t2 t3 t4 "
    assert result.output_tokens == 5
    assert len(result.itls) == 4  # gaps between 5 content chunks; the empty first chunk is not a token
    assert 0 < result.ttft <= result.e2e
    assert result.tpot == pytest.approx((result.e2e - result.ttft) / 4)


def test_stream_completion_counts_chunks_without_usage(fake_server) -> None:
    url, handler = fake_server
    handler.send_usage = False
    result = asyncio.run(_stream(url, "hello", 3))
    assert result.ok and result.output_tokens == 3 and len(result.itls) == 2


def test_errors_are_reported_not_raised(fake_server) -> None:
    url, _ = fake_server
    result = asyncio.run(_stream(url, "fail", 3))
    assert not result.ok and result.error.startswith("HTTP 400") and "bad prompt" in result.error

    async def closed_port() -> RequestResult:
        async with make_client(1) as client:
            return await complete(client, "http://127.0.0.1:9/v1/completions", {"prompt": "x"})

    refused = asyncio.run(closed_port())
    assert not refused.ok and "ConnectError" in refused.error


def test_run_level_respects_concurrency(fake_server) -> None:
    url, handler = fake_server

    async def go() -> dict:
        async with make_client(3) as client:
            bodies = [completion_body("fake-model", [i], 8, stream=True) for i in range(9)]
            return await run_level(client, f"{url}/v1/completions", bodies, concurrency=3)

    level = asyncio.run(go())
    assert level["requests"] == 9 and level["failed"] == 0 and level["output_tokens"] == 72
    assert 1 <= handler.max_in_flight <= 3


def test_run_bench_and_offline_mode_end_to_end(fake_server) -> None:
    url, handler = fake_server
    run = asyncio.run(run_bench(url + "/v1", [[1, 2], [3]], [(1, 2), (4, 4)], max_tokens=6, repeats=3))
    assert run["model"] == "fake-model"
    assert [lv["output_tokens"] for lv in run["levels"]] == [12, 24]
    for level in run["levels"]:  # three runs a level, the median one reported
        assert len(level["runs_tok_s"]) == 3 and level["runs_tok_s"] == sorted(level["runs_tok_s"])
        assert level["output_tok_s"] == pytest.approx(level["runs_tok_s"][1], abs=0.06)
    offline = run_openai(url, [[1], [2], [3], [4]], [1, 4], max_tokens=7)
    assert {size: entry["tokens"] for size, entry in offline.items()} == {"1": 7, "4": 28}
    for entry in offline.values():  # three runs each, the median one reported
        assert len(entry["runs_tok_s"]) == 3 and entry["runs_tok_s"] == sorted(entry["runs_tok_s"])
        assert entry["tok_s"] == pytest.approx(entry["runs_tok_s"][1], abs=0.06)
    assert handler.max_in_flight <= 4


# --- fairness: machine line, memory, isolated runs ---


def test_machine_info_names_the_cpu_and_its_features() -> None:
    from bench.common import cpu_model, machine_info, machine_line
    from engine.cpu_features import detect

    info = machine_info()
    assert info["cpu_model"] == cpu_model() and info["cpu_model"]
    assert info["cpu_features"] == detect().describe()
    line = machine_line(info)
    assert str(info["cpu_model"]) in line and detect().describe() in line


def test_write_report_heads_the_markdown_with_the_machine(tmp_path, capsys) -> None:
    from bench.common import machine_info, write_report

    out = tmp_path / "r.json"
    write_report(str(out), {"machine": machine_info()}, "| a |")
    text = out.with_suffix(".md").read_text()
    assert text.startswith("CPU: ") and text.rstrip().endswith("| a |")
    assert capsys.readouterr().out.startswith("CPU: ")


def _hold_memory(megabytes: int) -> dict[str, float]:
    """In a child: touch `megabytes` of memory, free it, report own RSS now and at peak."""
    from bench.common import process_memory

    block = bytearray(megabytes << 20)
    block[::4096] = b"x" * len(block[::4096])
    del block
    return process_memory()


def test_run_isolated_reports_the_childs_own_peak() -> None:
    from bench.common import process_memory, run_isolated

    before = process_memory()
    child = run_isolated(_hold_memory, 300)
    # The child's peak includes the 300 MB it touched; this process never held them.
    assert child["peak_mb"] >= 300 > child["rss_mb"] - 50
    assert process_memory()["peak_mb"] < before["peak_mb"] + 300


def test_process_memory_sums_a_server_and_its_children() -> None:
    import os
    import signal
    import subprocess

    from bench.common import _descendants, process_memory

    hold = "import time; b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold!r}])"])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process_memory(parent.pid)["rss_mb"] < 200:
            time.sleep(0.2)
        memory = process_memory(parent.pid)
        assert memory["rss_mb"] >= 200 and memory["peak_mb"] >= memory["rss_mb"]
    finally:
        for child in _descendants(parent.pid):
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert process_memory(parent.pid) == {"rss_mb": 0.0, "peak_mb": 0.0}  # gone: nothing to count


def test_memory_table_lists_systems_with_memory() -> None:
    from bench.common import memory_table

    systems = {"kvserve": {"1": {"tok_s": 1.0}, "memory": {"rss_idle_mb": 512.4, "peak_mb": 700.0}},
               "vllm (HTTP)": {"1": {"tok_s": 1.0}}}
    assert memory_table(systems).splitlines()[2] == "| kvserve | 512 | 700 |"
    assert len(memory_table(systems).splitlines()) == 3
    assert memory_table({"x": {"1": {}}}) == ""


# --- the profile's split ---


class _Event:
    def __init__(self, name: str, total: float, self_time: float = 0.0, parent: _Event | None = None) -> None:
        self.name, self.cpu_time_total, self.self_cpu_time_total = name, total, self_time
        self.cpu_parent = parent


def test_profile_split_assigns_ranges_and_overhead() -> None:
    from bench.profile import split

    # Two steps of 10 ms: forward 8 ms (matmul 5, attention 1, norm 0.5, rotary 0.5), sampling 1 ms.
    # Ops outside the kernel parts spent 4 ms of self time; the matmul and norm parts (kvserve's kernels are
    # ctypes calls, no op inside) count whole, and an op inside them is not counted twice.
    matmul = _Event("kv::matmul", 10_000)
    events = [_Event("kv::step", 10_000), _Event("kv::step", 10_000), _Event("kv::forward", 16_000),
              matmul, _Event("kv::attention", 2_000), _Event("kv::norm", 1_000),
              _Event("kv::rotary", 1_000), _Event("kv::sampling", 2_000),
              _Event("aten::mm", 9_000, 8_000, parent=matmul), _Event("aten::add", 4_000, 4_000)]
    ms = split(events, steps=2)
    assert ms["step"] == 10 and ms["forward"] == 8 and ms["matmul"] == 5
    assert ms["elementwise"] == 1 and ms["bookkeeping"] == 1
    assert ms["op_time"] == 7.5 and ms["dispatch_overhead"] == 2.5


def test_profile_ranges_wrap_and_restore() -> None:
    import engine.models.layers as layers
    from bench.profile import part_ranges

    original = layers.Linear.forward
    with part_ranges(), torch.profiler.profile() as prof:
        assert layers.Linear.forward is not original
        layers.Linear(4, 3)(torch.ones(2, 4))
    assert layers.Linear.forward is original
    assert any(e.name == "kv::matmul" for e in prof.events())


def test_profile_of_real_decode_steps_accounts_for_the_step(smollm2_gguf_path) -> None:
    from bench.common import chat_prompt_ids
    from bench.profile import PARTS, profile_batch
    from engine import LLM

    llm = LLM(str(smollm2_gguf_path), max_num_seqs=4)
    ms = profile_batch(llm, chat_prompt_ids(llm.tokenizer, 2), steps=2, trace_dir=None)
    assert all(ms[part] > 0 for part in PARTS)
    # The parts are disjoint ranges inside the step: they, the rest of the forward pass and the
    # bookkeeping add up to the step, and the ops' self time fits inside it.
    assert ms["matmul"] + ms["attention"] + ms["norm"] + ms["rotary"] < ms["forward"] < ms["step"]
    assert sum(ms[p] for p in (*PARTS, "elementwise", "bookkeeping")) == pytest.approx(ms["step"])
    assert 0 < ms["op_time"] < ms["step"] and ms["unprofiled_step"] > 0 and ms["unprofiled_modules_step"] > 0
    # The profiled requests were aborted: nothing left running, every KV block back in the pool.
    assert not llm.engine.has_unfinished()
    assert llm.engine.stats().num_kv_blocks_used == 0


def test_int4_microbenchmark_kernel_computes_the_q4_1_product() -> None:
    from bench.int4_matmul import GROUP, batch_invariant, int4_kernel, q4_1_weight

    codes, d, m, dense = q4_1_weight(64, 4 * GROUP, torch.Generator().manual_seed(0))
    assert torch.equal(dense[:, :GROUP], codes[:, :GROUP].float() * d[:, :1] + m[:, :1])
    x = torch.randn(5, 4 * GROUP, generator=torch.Generator().manual_seed(1))
    kernel = int4_kernel(codes, d, m, torch.bfloat16)
    reference = x @ dense.T
    # bf16 activations and scales: within bf16's rounding of the product, not exact
    assert (kernel(x) - reference).abs().max() <= 2e-2 * reference.abs().max()
    assert batch_invariant(kernel, x)


def test_speculative_bench_compares_plain_and_speculative_runs_of_the_real_model(smollm2_gguf_path, tmp_path) -> None:
    from bench import speculative

    out = tmp_path / "spec.json"
    code = speculative.main(["--model", str(smollm2_gguf_path), "--max-tokens", "24", "--runs", "1",
                             "--output", str(out)])
    data = json.loads(out.read_text())
    assert code == 0  # both produced the same tokens on every workload
    assert set(data["plain"]) == set(data["speculative"]) == set(speculative.WORKLOADS)
    assert all(run["draft_tokens"] == 0 for run in data["plain"].values())
    assert sum(run["accepted_tokens"] for run in data["speculative"].values()) > 0
    assert "| code edit |" in out.with_suffix(".md").read_text()


def test_speculative_streams_bench_alternates_configs_and_reports_them_as_resolved(smollm2_gguf_path,
                                                                                   tmp_path) -> None:
    from bench import speculative_streams

    out = tmp_path / "streams.json"
    assert speculative_streams.main(["--model", str(smollm2_gguf_path), "--max-tokens", "8", "--rounds", "2",
                                     "--streams", "1,3", "--config", 'k2={"num_speculative_tokens": 2, '
                                     '"disable_by_batch_size": 4}', "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["tok_s"]) == {"1", "3"}
    assert all(set(by) == {"off", "default", "k2"} and all(len(r) == 2 and min(r) > 0 for r in by.values())
               for by in data["tok_s"].values())
    assert data["resolved"]["off"] is None
    assert data["resolved"]["default"]["num_speculative_tokens"] in (1, 3)  # chosen for this CPU's kernels
    assert (data["resolved"]["k2"]["num_speculative_tokens"], data["resolved"]["k2"]["disable_by_batch_size"]) == (2, 4)
    assert "| 3 |" in out.with_suffix(".md").read_text()


def test_paged_attention_microbenchmark_compares_the_same_attention_both_ways() -> None:
    from bench.paged_attention import decode_case, prefill_case

    for native, sdpa in (decode_case(5, 3, 40, random.Random(0)), prefill_case(37)):
        torch.testing.assert_close(native(), sdpa(), rtol=1e-5, atol=1e-5)
