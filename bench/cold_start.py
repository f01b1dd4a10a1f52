"""Cold start: seconds from launching a fresh process to the first generated token reaching its stdout.

Modes: `cli` runs `kvserve generate PROMPT --max-tokens 1` (or `python -m service.cli` when the console
script is not installed); `api` runs a tiny script using `engine.LLM`; `transformers` (opt-in, slow: about a
minute here) loads the same GGUF with transformers and generates one token. Each is run --runs times.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from bench.common import fmt, machine_info, markdown_table, write_report

_API_SCRIPT = """
import sys
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1])
for piece in llm.stream(sys.argv[2], SamplingParams(max_tokens=1, temperature=0.0)):
    sys.stdout.write(piece or "?"); sys.stdout.flush()
"""

_HF_SCRIPT = """
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
ids = tok(sys.argv[2], return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=1, do_sample=False)
sys.stdout.write(tok.decode(out[0, ids.shape[1]:]) or "?"); sys.stdout.flush()
"""


def command_for(mode: str, model: str, prompt: str, hf_python: str) -> list[str]:
    """The command line whose first stdout byte marks the first token."""
    if mode == "cli":
        kvserve = shutil.which("kvserve")
        base = [kvserve] if kvserve else [sys.executable, "-m", "service.cli"]
        return base + ["generate", prompt, "--max-tokens", "1", "--model", model]
    if mode == "api":
        return [sys.executable, "-c", _API_SCRIPT, model, prompt]
    if mode == "transformers":
        from engine.models_registry import resolve_model

        return [hf_python, "-c", _HF_SCRIPT, resolve_model(model), prompt]
    raise ValueError(f"unknown mode {mode!r}")


def time_to_first_byte(cmd: list[str]) -> tuple[float, float]:
    """(seconds until the process writes its first stdout byte, seconds until it exits)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - start
    proc.stdout.read()
    code = proc.wait()
    total = time.perf_counter() - start
    if code != 0 or not first:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {code} and wrote {first!r}")
    return first_at, total


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name, GGUF file or HF dir")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--modes", default="cli,api", help="comma-separated: cli, api, transformers")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hf-python", default=sys.executable, help="interpreter for the transformers mode")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, dict] = {}
    for mode in modes:
        cmd = command_for(mode, args.model, args.prompt, args.hf_python)
        runs = [time_to_first_byte(cmd) for _ in range(args.runs)]
        firsts = [r[0] for r in runs]
        results[mode] = {"first_token_s": firsts, "exit_s": [r[1] for r in runs],
                         "median_s": statistics.median(firsts), "min_s": min(firsts)}
        print(f"{mode}: first token after {', '.join(f'{t:.2f}' for t in firsts)} s", flush=True)
    rows = [[mode, fmt(r["median_s"], 2), fmt(r["min_s"], 2), fmt(statistics.median(r["exit_s"]), 2)]
            for mode, r in results.items()]
    table = markdown_table(["mode", "first token s (median)", "min s", "process exit s"], rows)
    data = {"config": vars(args), "machine": machine_info(), "results": results}
    write_report(args.output, data, f"Cold start to first token, {args.runs} runs each\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
