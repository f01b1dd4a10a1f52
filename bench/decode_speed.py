"""Batch-1 greedy decode speed on one chat prompt: kvserve (engine.LLM) beside transformers `generate`.

Reports, per system, decode tok/s (tokens after the first / time after the first token), end-to-end tok/s
(all new tokens / wall time, prefill included) and TTFT; median over --runs, and resident memory after
warm-up (idle) and at peak. Each runs in its own fresh process, with the same prompt ids and the same number
of torch threads. Also prints how many leading tokens agree.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from bench.common import (
    chat_prompt_ids,
    fmt,
    load_tokenizer,
    machine_info,
    markdown_table,
    process_memory,
    run_isolated,
    write_report,
)


def speeds(new_tokens: int, wall: float, first_token: float, last_token: float) -> dict[str, float]:
    """decode tok/s (after the first token), e2e tok/s and TTFT (s) of one batch-1 generation."""
    decode = (new_tokens - 1) / (last_token - first_token) if new_tokens > 1 and last_token > first_token else 0.0
    return {"decode_tok_s": decode, "e2e_tok_s": new_tokens / wall, "ttft_s": first_token}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over runs."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _with_memory(speeds_: dict[str, float], idle: dict[str, float]) -> dict[str, float]:
    return {**speeds_, "rss_idle_mb": idle["rss_mb"], "peak_mb": process_memory()["peak_mb"]}


def bench_kvserve(model: str, prompt: list[int], max_tokens: int, runs: int, device: str, dtype: str,
                  threads: int | None = None):
    """(median speeds and memory, generated ids) of kvserve's offline API at batch 1 (run it isolated)."""
    from engine import LLM, SamplingParams

    _set_threads(threads)
    llm = LLM(model, device=device, dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([prompt[:8]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    idle = process_memory()
    measured, ids = [], []
    for _ in range(runs):
        start = time.perf_counter()
        mono_start = time.monotonic()  # the engine stamps its metrics with time.monotonic
        out = llm.generate([prompt], params)[0]
        wall = time.perf_counter() - start
        m = out.metrics
        measured.append(speeds(len(out.outputs[0].token_ids), wall, m.first_token_time - mono_start,
                               m.last_token_time - mono_start))
        ids = out.outputs[0].token_ids
    result = _with_memory(median_of(measured), idle)
    del llm
    gc.collect()
    return result, ids


def bench_transformers(prompt: list[int], max_tokens: int, runs: int, pad_id: int, threads: int | None = None):
    """(median speeds and memory, generated ids) of transformers generate at batch 1 (run it isolated)."""
    from bench.hf_peer import hf_generate, load_hf_model

    _set_threads(threads)
    model = load_hf_model()
    hf_generate(model, [prompt], 8, pad_id)
    idle = process_memory()
    measured, ids = [], []
    for _ in range(runs):
        run = hf_generate(model, [prompt], max_tokens, pad_id, clock=True)
        measured.append(speeds(run.new_tokens, run.seconds, run.token_times[0], run.token_times[-1]))
        ids = run.output_ids[0]
    result = _with_memory(median_of(measured), idle)
    del model
    gc.collect()
    return result, ids


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading positions where a and b agree."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per system (median reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    prompt = chat_prompt_ids(tokenizer, 1)[0]
    systems = {}
    kv, kv_ids = run_isolated(bench_kvserve, args.model, prompt, args.max_tokens, args.runs, args.device,
                              args.dtype, args.threads)
    systems["kvserve"] = kv
    print(f"kvserve: {kv['decode_tok_s']:.1f} decode tok/s", flush=True)
    notes = ""
    if not args.no_transformers:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        hf, hf_ids = run_isolated(bench_transformers, prompt, args.max_tokens, args.runs, pad_id, args.threads)
        systems["transformers"] = hf
        agree = common_prefix(kv_ids, hf_ids)
        notes = f"\n\nGreedy tokens identical for the first {agree} of {args.max_tokens} positions."
    rows = [[name, fmt(s["decode_tok_s"]), fmt(s["e2e_tok_s"]), fmt(s["ttft_s"] * 1e3, 0),
             fmt(s["rss_idle_mb"], 0), fmt(s["peak_mb"], 0)] for name, s in systems.items()]
    if "transformers" in systems and systems["transformers"]["decode_tok_s"]:
        notes = f"\n\nkvserve/transformers decode: {kv['decode_tok_s'] / systems['transformers']['decode_tok_s']:.2f}×" + notes
    table = markdown_table(["system", "decode tok/s", "e2e tok/s", "TTFT ms", "RSS idle MB", "RSS peak MB"], rows)
    title = f"Batch-1 greedy decode, {len(prompt)}-token chat prompt, {args.max_tokens} new tokens (median of {args.runs})\n\n"
    data = {"config": vars(args), "prompt_tokens": len(prompt), "machine": machine_info(), "systems": systems}
    write_report(args.output, data, title + table + notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
