"""Where a decode step's time goes: torch.profiler over engine steps at batch 1 and 64, split by model part.

Fills a batch with chat prompts, steps until every sequence decodes, then profiles --steps decode steps.
The model's parts are timed by wrapping them (for the profile only, not in the engine) in
`record_function` ranges: matmuls (every Linear and the LM head), attention (KV write, then kvserve's
paged kernel for decode rows, SDPA for prompt chunks), norms, rotary, the rest of the forward pass (embedding, residual adds, SiLU*mul: "elementwise"),
sampling, and engine bookkeeping (scheduler, input tensors, detokenization). "dispatch overhead" is wall
time minus the time spent inside ops (the sum of PyTorch ops' self times; kvserve's own kernels, called
through ctypes rather than as PyTorch ops, count whole: the paged kernel's range, and the matmul and norm
parts, whose Python is a few lines around the call): Python and dispatch. The split is of the modules' step;
where decode steps are recorded as kernel calls (engine/decode_graph.py), the step as served is timed
beside it.

With --http, also starts `kvserve serve` and compares streaming inter-token latency at concurrency 1 and
16 with the in-process step time at the same batch: the difference is the per-token HTTP/SSE cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import chat_prompt_ids, fmt, machine_info, markdown_table, process_memory, write_report

PARTS = ("matmul", "attention", "norm", "rotary", "sampling")


def _ranged(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name if name.startswith("kvserve::") else f"kv::{name}"):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def part_ranges():
    """Wrap the model's parts in record_function ranges while the block runs (monkeypatched, then restored)."""
    import engine.engine
    import engine.models.decoder as decoder
    import engine.models.layers as layers
    import engine.models.llama as llama
    import engine.paged_decode as paged_decode

    patches = [(layers.Linear, "forward", "matmul"), (decoder, "vocab_projection", "matmul"),
               (llama, "attention", "attention"), (layers.RMSNorm, "forward", "norm"),
               (layers.RMSNorm, "add_and_norm", "norm"),  # the residual add and the norm, one native pass
               (layers.RotaryEmbedding, "forward", "rotary"), (engine.engine, "sample", "sampling"),
               (engine.engine.ModelRunner, "execute", "forward"),
               # not a part but an op: the profiler sees no op inside a ctypes call, so it gets a range of its own
               (paged_decode, "decode_attention", "kvserve::paged_decode"), (llama, "silu_and_mul", "kvserve::silu_mul"),
               (llama, "residual_add", "kvserve::residual_add")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, name in patches:
        setattr(owner, attr, _ranged(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def fill_batch(llm, prompts: list[list[int]]) -> None:
    """Add the prompts (generations longer than any profile, EOS ignored); step until all of them decode."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(f"profile-{i}", prompt, params)
    while any(seq.num_output_tokens == 0 for seq in llm.engine.scheduler.running) or llm.engine.scheduler.waiting:
        llm.engine.step()


def drain(llm) -> None:
    for request_id in list(llm.engine._requests):
        llm.engine.abort(request_id)
    while llm.engine.has_unfinished():
        llm.engine.step()


def step_ms(llm, steps: int) -> float:
    """Median wall ms of `steps` unprofiled decode steps."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        llm.engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


KERNEL_PARTS = ("matmul", "norm")


def _inside(event, parts: tuple[str, ...]) -> bool:
    names = {f"kv::{part}" for part in parts}
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def split(events, steps: int) -> dict[str, float]:
    """ms per step of each part, from a profile of `steps` engine steps wrapped in kv::step ranges."""
    ranges = {name: 0.0 for name in (*PARTS, "forward", "step")}
    op_time = 0.0
    for event in events:
        if event.name.startswith("kv::"):
            ranges[event.name[4:]] += event.cpu_time_total
        elif not _inside(event, KERNEL_PARTS):
            op_time += event.self_cpu_time_total
    # kvserve's own kernels (int4 matmuls, RMSNorm) are ctypes calls the profiler sees no op in: those parts
    # count as op time whole (the Python around each call is a few lines)
    op_time += sum(ranges[part] for part in KERNEL_PARTS)
    ms = {name: total / 1e3 / steps for name, total in ranges.items()}
    ms["elementwise"] = ms["forward"] - sum(ms[p] for p in ("matmul", "attention", "norm", "rotary"))
    ms["bookkeeping"] = ms["step"] - ms["forward"] - ms["sampling"]
    ms["op_time"] = op_time / 1e3 / steps
    ms["dispatch_overhead"] = ms["step"] - ms["op_time"]
    return ms


def profile_batch(llm, prompts: list[list[int]], steps: int, trace_dir: str | None) -> dict[str, float]:
    fill_batch(llm, prompts)
    runner = llm.engine.runner
    recording = runner.records_decode_steps
    before = step_ms(llm, steps)  # as served: a decode step replays its recorded kernel calls, where recorded
    runner.records_decode_steps = False  # the split times the modules' parts, so they run
    try:
        modules_before = step_ms(llm, steps)
        with part_ranges(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("kv::step"):
                    llm.engine.step()
        modules_after = step_ms(llm, steps)
    finally:
        runner.records_decode_steps = recording
    after = step_ms(llm, steps)  # before and after: on a shared machine the load moves while we measure
    drain(llm)
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(trace_dir) / f"decode_b{len(prompts)}.json"))
    result = split(prof.events(), steps)
    result["unprofiled_step"] = (before + after) / 2
    result["unprofiled_modules_step"] = (modules_before + modules_after) / 2
    return result


SPLIT_ROWS = [("matmuls (Linear + LM head)", "matmul"), ("attention (KV write, paged kernel)", "attention"),
              ("norms", "norm"), ("rotary", "rotary"), ("elementwise (embed, residual, SiLU*mul)", "elementwise"),
              ("sampling", "sampling"), ("engine bookkeeping (schedule, inputs, detokenize)", "bookkeeping"),
              ("**step, profiled**", "step"), ("step, unprofiled, the modules run", "unprofiled_modules_step"),
              ("step, unprofiled, as served (the recorded step, engine/decode_graph.py)", "unprofiled_step"),
              ("of which inside ops and kvserve kernels", "op_time"), ("Python/dispatch overhead (wall - op time)",
                                                            "dispatch_overhead")]


def split_table(results: dict[str, dict[str, float]]) -> str:
    headers = ["part"] + [f"batch {b}: ms/step" for b in results] + [f"batch {b}: share" for b in results]
    rows = []
    for label, key in SPLIT_ROWS:
        share = [fmt(100 * r[key] / r["step"], 0) + "%" if not key.startswith("unprofiled") else "" for r in results.values()]
        rows.append([label] + [fmt(r[key], 2) for r in results.values()] + share)
    return markdown_table(headers, rows)


def http_itl(model: str, port: int, prompts: list[list[int]], levels: list[tuple[int, int]], max_tokens: int,
             log_dir: Path) -> dict[str, dict]:
    """Streaming ITL p50 and server RSS from a kvserve server at each (concurrency, requests) level."""
    from bench import peers, serve_bench

    proc = peers.start_server("kvserve-nospec", port, model, log_dir, timeout=300)
    try:
        idle = process_memory(proc.pid)
        run = asyncio.run(serve_bench.run_bench(f"http://127.0.0.1:{port}", prompts, levels, max_tokens))
        peak = process_memory(proc.pid)
    finally:
        peers.stop_server(proc)
    return {str(level["concurrency"]): {"itl_p50_ms": level["itl_ms"]["p50"], "tok_s": level["output_tok_s"],
                                        "rss_idle_mb": idle.get("rss_mb"), "rss_peak_mb": peak.get("peak_mb")}
            for level in run["levels"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto (fp32 on CPU) or bfloat16 (AMX CPUs)")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled (and timed unprofiled)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--http", action="store_true", help="also streaming ITL over HTTP at concurrency 1 and 16")
    parser.add_argument("--http-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8133)
    parser.add_argument("--trace-dir", default=None, help="also write chrome traces (decode_bN.json) here")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # and the server started for --http
    from engine import LLM

    # Plain decode steps: speculation would make batch 1's steps verify several rows (bench.speculative has those).
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, max_num_seqs=64, speculative=None)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts = chat_prompt_ids(llm.tokenizer, max(batch_sizes + [16]))
    results = {}
    for batch in batch_sizes:
        results[str(batch)] = profile_batch(llm, prompts[:batch], args.steps, args.trace_dir)
        print(f"batch {batch}: {results[str(batch)]['step']:.1f} ms/step profiled", flush=True)
    info = machine_info()
    sections = [f"Decode step split, {llm.engine.quantization} weights, {torch.get_num_threads()} threads, "
                f"{args.steps} steps, load average {info.get('loadavg_1m')}. The profiler adds a few µs per op, "
                f"which lands in the dispatch row; compare its step with the unprofiled one\n\n" + split_table(results)]
    data: dict = {"machine": info, "quantization": llm.engine.quantization, "threads": torch.get_num_threads(),
                  "split_ms": results}
    if args.http:
        in_process = {}
        for batch in (1, 16):
            fill_batch(llm, prompts[:batch])
            in_process[str(batch)] = step_ms(llm, 2 * args.steps)
            drain(llm)
        del llm
        http = http_itl(args.model, args.port, prompts, [(1, 4), (16, 16)], args.http_tokens,
                        Path(args.trace_dir or "/tmp"))
        rows = [[c, fmt(in_process[c], 1), fmt(h["itl_p50_ms"], 1), fmt(h["itl_p50_ms"] - in_process[c], 1),
                 fmt(h["tok_s"]), fmt(h["rss_idle_mb"], 0), fmt(h["rss_peak_mb"], 0)] for c, h in http.items()]
        sections.append("Streaming over HTTP vs in-process steps (per token)\n\n" + markdown_table(
            ["concurrency", "in-process step ms", "HTTP ITL p50 ms", "HTTP/SSE ms per token", "HTTP tok/s",
             "server RSS idle MB", "server RSS peak MB"], rows))
        data["http"], data["in_process_step_ms"] = http, in_process
    write_report(args.output, data, "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
