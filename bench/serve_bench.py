"""Serving benchmark against any OpenAI-compatible URL: streaming /v1/completions at fixed concurrency.

For each concurrency level, N requests are sent through a closed loop of C in flight (no request rate cap),
each streaming its tokens. Reports TTFT, inter-token latency (ITL), end-to-end latency (p50/p99) and output
tok/s, as JSON and a markdown table. Prompts are token ids (chat prompts or random) unless --text-prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import (
    chat_prompt_ids,
    fmt,
    load_tokenizer,
    machine_info,
    markdown_table,
    parse_int_list,
    random_prompt_ids,
    summarize,
    warmup_prompts,
    write_report,
)
from bench.openai_client import (
    RequestResult,
    base_url_of,
    completion_body,
    make_client,
    served_model,
    stream_completion,
)

Prompt = str | list[int]


def aggregate(results: list[RequestResult], duration: float, concurrency: int) -> dict:
    """Latency percentiles (ms for TTFT/ITL/TPOT, s for e2e) and throughput of one concurrency level."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "output_tokens": tokens,
        "output_tok_s": tokens / duration if duration > 0 else 0.0,
        "request_s": len(ok) / duration if duration > 0 else 0.0,
        "ttft_ms": summarize([r.ttft * 1e3 for r in ok if r.ttft is not None]),
        "itl_ms": summarize([gap * 1e3 for r in ok for gap in r.itls]),
        "tpot_ms": summarize([r.tpot * 1e3 for r in ok if r.tpot is not None]),
        "e2e_s": summarize([r.e2e for r in ok if r.e2e is not None]),
    }


async def run_level(client, url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body with at most `concurrency` in flight; aggregate the results."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict) -> RequestResult:
        async with gate:
            return await stream_completion(client, url, body)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bodies))
    return aggregate(list(results), time.perf_counter() - start, concurrency)


async def run_bench(url: str, prompts: list[Prompt], levels: list[tuple[int, int]], max_tokens: int,
                    ignore_eos: bool = True, model: str | None = None, api_key: str | None = None,
                    repeats: int = 1) -> dict:
    """All levels [(concurrency, num_requests)] against one server, after a short warm-up; each level `repeats`
    times, the run with the median throughput reported (every run's in `runs_tok_s`)."""
    base = base_url_of(url)
    endpoint = f"{base}/v1/completions"
    async with make_client(max(c for c, _ in levels), api_key) as client:
        model = model or await served_model(client, base)
        warm_bodies = [completion_body(model, p, 4, True) for p in warmup_prompts(prompts)]
        warm = await run_level(client, endpoint, warm_bodies, 2)
        if warm["failed"]:
            raise RuntimeError(f"warm-up against {url} failed: {warm['errors']}")
        out = []
        for concurrency, count in levels:
            bodies = [completion_body(model, prompts[i % len(prompts)], max_tokens, True, ignore_eos)
                      for i in range(count)]
            # A level takes 5-40 s, within which these VMs drift by 10-20%: the median of a few runs steadies it.
            runs = sorted([await run_level(client, endpoint, bodies, concurrency) for _ in range(repeats)],
                          key=lambda run: run["output_tok_s"])
            # every run's throughput and failures stay beside the median run's figures, so none goes unseen
            level = {**runs[len(runs) // 2], "runs_tok_s": [round(run["output_tok_s"], 1) for run in runs],
                     "runs_failed": [run["failed"] for run in runs]}
            median = f" (median of {repeats}: {level['runs_tok_s']})" if repeats > 1 else ""
            print(f"{url} c={concurrency}: {level['output_tok_s']:.1f} tok/s{median}, TTFT p50 "
                  f"{level['ttft_ms']['p50']:.0f} ms, failed {sum(level['runs_failed'])}", flush=True)
            out.append(level)
    return {"url": url, "model": model, "levels": out}


def serving_table(runs: dict[str, dict]) -> str:
    """One row per (server, concurrency): throughput and latency percentiles."""
    headers = ["server", "conc", "reqs", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
               "e2e p50 s", "e2e p99 s"]
    rows = []
    for name, run in runs.items():
        for lv in run["levels"]:
            reqs = f"{lv['requests'] - lv['failed']}/{lv['requests']}"
            rows.append([name, lv["concurrency"], reqs, fmt(lv["output_tok_s"]),
                         fmt(lv["ttft_ms"]["p50"], 0), fmt(lv["ttft_ms"]["p99"], 0),
                         fmt(lv["itl_ms"]["p50"], 0), fmt(lv["itl_ms"]["p99"], 0),
                         fmt(lv["e2e_s"]["p50"], 2), fmt(lv["e2e_s"]["p99"], 2)])
    return markdown_table(headers, rows)


def levels_from(concurrency: list[int], num_prompts: list[int]) -> list[tuple[int, int]]:
    """Pair concurrency levels with request counts; one count applies to every level."""
    if len(num_prompts) == 1:
        num_prompts = num_prompts * len(concurrency)
    if len(num_prompts) != len(concurrency):
        raise ValueError(f"--num-prompts needs 1 or {len(concurrency)} values, got {len(num_prompts)}")
    return list(zip(concurrency, num_prompts, strict=True))


def prompt_ids(args: argparse.Namespace, count: int) -> list[list[int]]:
    """Chat prompts (the fixed question list) or --input-len random token ids."""
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset == "chat":
        return chat_prompt_ids(tokenizer, count)
    special = {*tokenizer.eos_token_ids, *([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])}
    return random_prompt_ids(count, args.input_len, tokenizer.vocab_size, args.seed, avoid=special)


def make_prompts(args: argparse.Namespace, count: int) -> list[Prompt]:
    """The prompts to send: token ids, or their text with --text-prompts."""
    ids = prompt_ids(args, count)
    if args.text_prompts:
        tokenizer = load_tokenizer(args.tokenizer)
        return [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload flags, shared with the bench.peers driver."""
    parser.add_argument("--concurrency", type=parse_int_list, default=[1, 16, 64], help="levels, e.g. 1,16,64")
    parser.add_argument("--num-prompts", type=parse_int_list, default=[8, 32, 64],
                        help="requests per level (one value for all, or one per level)")
    parser.add_argument("--dataset", choices=["chat", "random"], default="chat",
                        help="chat: ~40-token chat prompts; random: --input-len random token ids")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens for --dataset random")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per level; the run with the median throughput is reported")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="stop at EOS")
    parser.add_argument("--text-prompts", action="store_true", help="send text prompts instead of token ids")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="kvserve model whose tokenizer makes prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with or without /v1)")
    parser.add_argument("--label", default=None, help="name of the server in the table (default: the URL)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    add_arguments(parser)
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    levels = levels_from(args.concurrency, args.num_prompts)
    prompts = make_prompts(args, max(n for _, n in levels))
    run = asyncio.run(run_bench(args.url, prompts, levels, args.max_tokens, args.ignore_eos, args.model,
                                args.api_key, args.repeats))
    runs = {args.label or args.url: run}
    data = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "machine": machine_info(),
            "runs": runs}
    title = f"Serving benchmark ({args.dataset} prompts, {args.max_tokens} output tokens, streaming)\n\n"
    write_report(args.output, data, title + serving_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
