"""N-gram speculative decoding at batch 1: plain vs speculative decoding on repetitive and free tasks.

Workloads are chat requests whose answer repeats much of the prompt (a code edit, a list turned into
JSON, a summary) and one whose answer does not (a story), where drafts rarely match and the cost of
looking for them shows. kvserve runs in-process, plain and with `speculative_config` ngram, each in its own
process; per workload it reports decode tok/s (after the first token), the speed-up, the share of draft
tokens accepted, and checks the two produced the same tokens (greedy; `--temperature` samples instead). `--url NAME=URL` also measures
OpenAI-compatible servers (kvserve serve --speculative-config ..., llama.cpp's server) with the same
requests over HTTP: end-to-end tok/s of a non-streamed greedy chat completion, prefill included.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from bench.common import fmt, machine_info, markdown_table, run_isolated, write_report

_CODE = '''def load_orders(path):
    orders = []
    with open(path) as handle:
        for line in handle:
            fields = line.strip().split(",")
            if len(fields) != 3:
                continue
            customer, item, amount = fields
            orders.append({"customer": customer, "item": item, "amount": float(amount)})
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        totals[order["customer"]] = totals.get(order["customer"], 0.0) + order["amount"]
    return totals
'''
_PEOPLE = ("Alice Martin, Paris, engineer\nBruno Silva, Lisbon, teacher\nChen Wei, Shanghai, doctor\n"
           "Dana Novak, Prague, designer\nEmeka Obi, Lagos, lawyer\nFatima Zahra, Rabat, pilot\n")
_ARTICLE = ("The city council approved a plan on Tuesday to add forty kilometres of protected bike lanes over the "
            "next three years. The plan, which costs twelve million euros, connects the northern suburbs with the "
            "old town and the university. Supporters say it will cut traffic and make cycling safer for children. "
            "Some shop owners worry that removing parking spaces will hurt their business. The first lanes will "
            "open next spring along the river.")

WORKLOADS = {
    "code edit": f"Rename the variable `orders` to `records` everywhere in this code. Reply with the full code.\n\n{_CODE}",
    "list to JSON": f"Convert this list into a JSON array of objects with keys name, city and job.\n\n{_PEOPLE}",
    "summary": f"Summarize this article in three sentences.\n\n{_ARTICLE}",
    "story (free text)": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def _messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def bench_in_process(model: str, speculative_config: str | None, max_tokens: int, runs: int,
                     temperature: float = 0.0) -> dict[str, dict]:
    """Per workload: median decode tok/s, tokens, and draft/accepted counts of the last run (run isolated)."""
    from engine import LLM, SamplingParams
    from engine.speculative import NgramConfig

    llm = LLM(model, speculative=NgramConfig.parse(speculative_config) if speculative_config else None)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    llm.chat(_messages("Hi"), SamplingParams(max_tokens=8, temperature=0.0))
    results = {}
    for name, prompt in WORKLOADS.items():
        rates = []
        for _ in range(runs):
            before = llm.engine.stats()
            out = llm.chat(_messages(prompt), params)[0]
            after = llm.engine.stats()
            tokens, m = out.outputs[0].token_ids, out.metrics
            rates.append((len(tokens) - 1) / max(m.last_token_time - m.first_token_time, 1e-9))
        results[name] = {"decode_tok_s": statistics.median(rates), "token_ids": list(tokens),
                         "draft_tokens": after.spec_draft_tokens - before.spec_draft_tokens,
                         "accepted_tokens": after.spec_accepted_tokens - before.spec_accepted_tokens}
    if llm.engine.speculative:  # unset keys as the engine chose them for its kernels (engine.speculative.for_kernels)
        results["config"] = dataclasses.asdict(llm.engine.speculative)
    return results


def bench_url(url: str, model: str, max_tokens: int, runs: int) -> dict[str, dict]:
    """Per workload: median end-to-end tok/s of a non-streamed greedy chat completion."""
    import httpx

    results = {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=600) as client:
        def ask(prompt: str, tokens: int) -> int:
            body = {"model": model, "messages": _messages(prompt), "max_tokens": tokens, "temperature": 0}
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        ask("Hi", 8)
        for name, prompt in WORKLOADS.items():
            rates, count = [], 0
            for _ in range(runs):
                start = time.perf_counter()
                count = ask(prompt, max_tokens)
                rates.append(count / (time.perf_counter() - start))
            results[name] = {"e2e_tok_s": statistics.median(rates), "tokens": count}
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per workload (median reported)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (unseeded above 0: tokens differ between runs, so not compared)")
    parser.add_argument("--speculative-config", default='{"method": "ngram"}',
                        help="vLLM's JSON for the speculative run (default: kvserve's defaults)")
    parser.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                        help="also measure this OpenAI-compatible server over HTTP (repeatable)")
    parser.add_argument("--served-model", default="smollm2-135m", help="`model` sent to --url servers")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain = run_isolated(bench_in_process, args.model, None, args.max_tokens, args.runs, args.temperature)
    spec = run_isolated(bench_in_process, args.model, args.speculative_config, args.max_tokens, args.runs,
                        args.temperature)
    config = spec.pop("config")  # as the engine resolved it
    sampled = args.temperature > 0
    rows = []
    for name in WORKLOADS:
        p, s = plain[name], spec[name]
        accepted = s["accepted_tokens"] / s["draft_tokens"] if s["draft_tokens"] else 0.0
        rows.append([name, len(p["token_ids"]), fmt(p["decode_tok_s"]), fmt(s["decode_tok_s"]),
                     f"{s['decode_tok_s'] / p['decode_tok_s']:.2f}x", f"{accepted:.0%}",
                     "(sampled)" if sampled else "yes" if p["token_ids"] == s["token_ids"] else "NO"])
    table = markdown_table(["workload", "tokens", "plain tok/s", "speculative tok/s", "speed-up",
                            "drafts accepted", "same tokens"], rows)
    mode = f"temperature {args.temperature} (unseeded)" if sampled else "greedy"
    title = (f"Batch-1 {mode} decode in-process, decode tok/s (median of {args.runs}), up to {args.max_tokens} new "
             f"tokens; speculative: k={config['num_speculative_tokens']}, n-grams "
             f"{config['prompt_lookup_max']}..{config['prompt_lookup_min']}\n\n")
    servers = {}
    for entry in args.url:
        label, _, url = entry.partition("=")
        servers[label] = bench_url(url, args.served_model, args.max_tokens, args.runs)
    if servers:
        http_rows = [[name, *(f"{fmt(res[name]['e2e_tok_s'])} ({res[name]['tokens']})" for res in servers.values())]
                     for name in WORKLOADS]
        table += ("\n\nOver HTTP, end-to-end tok/s of a non-streamed greedy chat completion (tokens generated):\n\n"
                  + markdown_table(["workload", *servers], http_rows))
    data = {"config": vars(args), "machine": machine_info(), "plain": plain, "speculative": spec,
            "speculative_config": config, "servers": servers}
    write_report(args.output, data, title + table)
    return 0 if sampled or all(plain[n]["token_ids"] == spec[n]["token_ids"] for n in WORKLOADS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
