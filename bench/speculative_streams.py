"""N-gram speculation with several streams at once: output tok/s with speculation off, at kvserve's defaults, and
with any other `--config`, on bench.speculative's tasks started side by side.

Streams 1 runs each task alone; 2 runs them in overlapping pairs; 4 runs all four together; 8 runs each twice
(greedy, EOS honoured, so the batch shrinks as answers end and speculation starts once few are left). All
configs run in one process, switched on the engine between runs and alternated round by round, so the VM's
drift falls on them alike; the mean over rounds is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from bench.common import fmt, machine_info, markdown_table, parse_int_list, write_report
from bench.speculative import WORKLOADS


def stream_sets(streams: int) -> list[list[str]]:
    """Groups of task names run together: `streams` of them at a time."""
    names = list(WORKLOADS)
    if streams == 1:
        return [[name] for name in names]
    if streams == 2:
        return [names[0:2], names[1:3], names[2:4]]
    return [(names * (streams // len(names) + 1))[:streams]]


def measure(model: str, configs: dict[str, str | None], streams: list[int], rounds: int,
            max_tokens: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict | None]]:
    """tok/s per config per stream count (one figure a round), and each config as the engine resolved it."""
    from engine import LLM, SamplingParams
    from engine.models.cpu_matmul import rows_cost_arithmetic
    from engine.speculative import NgramConfig, for_kernels

    llm = LLM(model)
    costly = llm.engine.device == "cpu" and rows_cost_arithmetic(llm.engine.quantization)
    engine_configs = {name: None if text is None else for_kernels(NgramConfig.parse(text), costly)
                      for name, text in configs.items()}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=8, temperature=0.0))
    rates: dict[str, dict[str, list[float]]] = {str(n): {name: [] for name in configs} for n in streams}
    for _ in range(rounds):
        for count in streams:
            for name, config in engine_configs.items():
                llm.engine.speculative = config
                tokens, elapsed = 0, 0.0
                for group in stream_sets(count):
                    start = time.perf_counter()
                    outputs = llm.chat([[{"role": "user", "content": WORKLOADS[task]}] for task in group], params)
                    elapsed += time.perf_counter() - start
                    tokens += sum(len(out.outputs[0].token_ids) for out in outputs)
                rates[str(count)][name].append(tokens / elapsed)
    resolved = {name: config and dataclasses.asdict(config) for name, config in engine_configs.items()}
    return rates, resolved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative_streams", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--streams", type=parse_int_list, default=[1, 2, 4, 8], help="comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=JSON",
                        help="also measure this speculative_config (vLLM's JSON; unset keys as the engine chooses)")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs: dict[str, str | None] = {"off": None, "default": '{"method": "ngram"}'}
    configs.update(entry.split("=", 1) for entry in args.config)
    rates, resolved = measure(args.model, configs, args.streams, args.rounds, args.max_tokens)
    rows = [[count, *(fmt(sum(by[name]) / len(by[name])) for name in configs)] for count, by in rates.items()]
    described = "; ".join(f"{name}: k={config['num_speculative_tokens']}, at most "
                          f"{config['disable_by_batch_size']} running" for name, config in resolved.items() if config)
    machine = machine_info()
    title = (f"Output tok/s, mean of {args.rounds} rounds, greedy, up to {args.max_tokens} "
             f"tokens, EOS honoured ({described})\n\n")
    write_report(args.output, {"config": vars(args), "machine": machine, "tok_s": rates, "resolved": resolved},
                 title + markdown_table(["streams", *configs], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
