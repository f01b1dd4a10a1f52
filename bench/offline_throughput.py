"""Offline throughput: a whole batch of ~40-token chat prompts, 128 new tokens each, EOS ignored.

Measures kvserve in-process (engine.LLM, each weight format) and transformers `generate` (left-padded batch,
greedy), each in its own fresh process, with its resident memory after warm-up (idle) and at peak, and optionally any OpenAI-compatible server (`--openai-url name=URL`: the batch is sent at once as
concurrent /v1/completions, three times: the median run counts). Prints a markdown table of output tok/s and kvserve's ratio to each peer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time

from bench.common import (
    HF_MODEL_DIR,
    chat_prompt_ids,
    fmt,
    load_tokenizer,
    machine_info,
    markdown_table,
    memory_table,
    parse_int_list,
    process_memory,
    run_isolated,
    warmup_prompts,
    write_report,
)

# batch size (as str, JSON-friendly) -> {"tok_s", "tokens", "seconds"}; in-process runs add "memory"
Results = dict[str, dict[str, float]]


def _entry(tokens: int, seconds: float) -> dict[str, float]:
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds}


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_kvserve(model: str, prompts: list[list[int]], batch_sizes: list[int], max_tokens: int,
                device: str = "auto", dtype: str = "auto", quantization: str = "auto",
                threads: int | None = None) -> Results:
    """kvserve's offline API, one generate() call per batch size, after a short warm-up (run it isolated)."""
    from engine import LLM, SamplingParams

    _set_threads(threads)
    llm = LLM(model, device=device, dtype=dtype, quantization=quantization, max_num_seqs=max(64, *batch_sizes))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(warmup_prompts(prompts), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    idle = process_memory()
    results: Results = {}
    for size in batch_sizes:
        start = time.perf_counter()
        outputs = llm.generate(prompts[:size], params)
        seconds = time.perf_counter() - start
        results[str(size)] = _entry(sum(len(o.outputs[0].token_ids) for o in outputs), seconds)
        print(f"kvserve ({quantization}) batch {size}: {results[str(size)]['tok_s']:.1f} tok/s", flush=True)
    results["memory"] = {"rss_idle_mb": idle["rss_mb"], "peak_mb": process_memory()["peak_mb"]}
    del llm
    gc.collect()
    return results


def run_transformers(prompts: list[list[int]], batch_sizes: list[int], max_tokens: int, pad_id: int,
                     threads: int | None = None) -> Results:
    """transformers generate on a left-padded batch, greedy, exactly max_tokens new tokens per row (run it isolated)."""
    from bench.hf_peer import hf_generate, load_hf_model

    _set_threads(threads)
    model = load_hf_model()
    hf_generate(model, warmup_prompts(prompts), 4, pad_id)
    idle = process_memory()
    results: Results = {}
    for size in batch_sizes:
        run = hf_generate(model, prompts[:size], max_tokens, pad_id)
        results[str(size)] = _entry(run.new_tokens, run.seconds)
        print(f"transformers batch {size}: {results[str(size)]['tok_s']:.1f} tok/s", flush=True)
    results["memory"] = {"rss_idle_mb": idle["rss_mb"], "peak_mb": process_memory()["peak_mb"]}
    del model
    gc.collect()
    return results


async def _openai_batches(url: str, prompts: list[str] | list[list[int]], batch_sizes: list[int],
                          max_tokens: int, api_key: str | None, repeats: int) -> Results:
    from bench.openai_client import base_url_of, complete, completion_body, make_client, served_model

    base = base_url_of(url)
    results: Results = {}
    async with make_client(max(batch_sizes), api_key) as client:
        model = await served_model(client, base)

        async def batch(batch_prompts: list, tokens: int) -> tuple[int, float]:
            bodies = [completion_body(model, p, tokens, stream=False) for p in batch_prompts]
            start = time.perf_counter()
            done = await asyncio.gather(*(complete(client, f"{base}/v1/completions", b) for b in bodies))
            seconds = time.perf_counter() - start
            failed = [r.error for r in done if not r.ok]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(bodies)} requests failed, first: {failed[0]}")
            return sum(r.output_tokens for r in done), seconds

        await batch(warmup_prompts(prompts), 4)
        for size in batch_sizes:
            runs = []
            for _ in range(repeats):
                tokens, seconds = await batch(prompts[:size], max_tokens)
                if tokens != size * max_tokens:
                    print(f"warning: {url} returned {tokens} tokens, expected {size * max_tokens} (ignore_eos honoured?)")
                runs.append(_entry(tokens, seconds))
            # The median run: one batch-1 request takes about a second, within which these VMs drift by 10-20%.
            runs.sort(key=lambda run: run["tok_s"])
            results[str(size)] = {**runs[len(runs) // 2], "runs_tok_s": [round(run["tok_s"], 1) for run in runs]}
            print(f"{url} batch {size}: {results[str(size)]['tok_s']:.1f} tok/s (median of {repeats}: "
                  f"{results[str(size)]['runs_tok_s']})", flush=True)
    return results


def run_openai(url: str, prompts: list[str] | list[list[int]], batch_sizes: list[int], max_tokens: int,
               api_key: str | None = None, repeats: int = 3) -> Results:
    """Offline-style throughput of an OpenAI-compatible server: each batch sent at once, non-streaming, `repeats`
    times; the median run is reported (all runs in `runs_tok_s`)."""
    return asyncio.run(_openai_batches(url, prompts, batch_sizes, max_tokens, api_key, repeats))


def throughput_table(systems: dict[str, Results], batch_sizes: list[int], reference: str = "kvserve") -> str:
    """Rows per batch size: tok/s of every system, then reference/peer ratios."""
    peers = [name for name in systems if name != reference] if reference in systems else []
    headers = ["batch"] + [f"{name} tok/s" for name in systems] + [f"{reference}/{p}" for p in peers]
    rows = []
    for size in batch_sizes:
        speeds = {name: res.get(str(size), {}).get("tok_s") for name, res in systems.items()}
        ratios = [speeds[reference] / speeds[p] if speeds[reference] and speeds[p] else None for p in peers]
        rows.append([size] + [fmt(speeds[name]) for name in systems] + [fmt(r, 2) + "×" if r else "-" for r in ratios])
    return markdown_table(headers, rows)


def _named_url(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    return (name, url) if sep and not name.startswith("http") else (text, text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.offline_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="kvserve model (registry name, GGUF or HF dir)")
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 16, 64], help="e.g. 1,16,64")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (EOS ignored)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantizations", default=None,
                        help="kvserve weight formats to run, comma-separated, each optionally DTYPE/FORMAT "
                             "(bfloat16/auto: the whole model in bf16); auto is reported as plain kvserve "
                             "(default: auto,fp16,none, plus bfloat16/auto on CPUs with AMX)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for kvserve and transformers")
    parser.add_argument("--no-kvserve", action="store_true", help="skip kvserve in-process")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers generate")
    parser.add_argument("--openai-url", action="append", default=[], metavar="[NAME=]URL",
                        help="also measure a running OpenAI-compatible server, e.g. vllm=http://127.0.0.1:8100")
    parser.add_argument("--text-prompts", action="store_true",
                        help="send prompts to servers as text instead of token ids")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="add the systems of an earlier run's JSON output as columns")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def variant_name(dtype: str, quantization: str) -> str:
    """kvserve, kvserve-int8, kvserve-bfloat16 (a dtype with auto weights), kvserve-bfloat16-int8..."""
    parts = [p for p in (dtype, "" if quantization == "auto" else quantization) if p]
    return "-".join(["kvserve", *parts])


def default_variants() -> str:
    from engine.models.cpu_matmul import format_refusal

    return "auto,fp16,none" + (",bfloat16/auto" if format_refusal("bf16") is None else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quantizations = args.quantizations or default_variants()
    tokenizer = load_tokenizer(args.model)
    prompts = chat_prompt_ids(tokenizer, max(args.batch_sizes))
    print(f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.max_tokens} new tokens each", flush=True)
    systems: dict[str, Results] = {}
    for path in args.merge:
        with open(path) as f:
            systems.update(json.load(f)["systems"])
    if not args.no_kvserve:
        for variant in (v.strip() for v in args.quantizations.split(",") if v.strip()):
            dtype, _, quantization = variant.rpartition("/")
            systems[variant_name(dtype, quantization)] = run_isolated(
                run_kvserve, args.model, prompts, args.batch_sizes, args.max_tokens, args.device,
                dtype or args.dtype, quantization, args.threads)
    if not args.no_transformers:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        systems["transformers"] = run_isolated(run_transformers, prompts, args.batch_sizes, args.max_tokens, pad_id,
                                               args.threads)
    server_prompts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts] if args.text_prompts else prompts
    for spec in args.openai_url:
        name, url = _named_url(spec)
        systems[name] = run_openai(url, server_prompts, args.batch_sizes, args.max_tokens, args.api_key)
    data = {"config": {"model": args.model, "batch_sizes": args.batch_sizes, "max_tokens": args.max_tokens,
                       "prompt_tokens": [len(p) for p in prompts], "device": args.device, "dtype": args.dtype,
                       "quantizations": args.quantizations,
                       "transformers_model": str(HF_MODEL_DIR)},
            "machine": machine_info(), "systems": systems}
    title = f"Offline throughput, output tok/s ({args.max_tokens} new tokens per prompt, EOS ignored)\n\n"
    memory = memory_table(systems)
    memory = f"\n\nResident memory (each system in its own process)\n\n{memory}" if memory else ""
    write_report(args.output, data, title + throughput_table(systems, args.batch_sizes) + memory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
