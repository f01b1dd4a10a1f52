"""Cold start: seconds from launching a fresh process to the first generated token reaching its stdout.

Modes: `cli` runs `kvserve generate PROMPT --max-tokens 1` (or `python -m service.cli` when the console
script is not installed); `api` runs a tiny script using `engine.LLM`; `serve` starts `kvserve serve` and
posts a one-token completion every 20 ms until one is answered (its time is to that answer);
`transformers` (opt-in, slow: about a minute here) loads the same GGUF with transformers and generates one
token. Each is run --runs times. The first run of a mode may convert or measure what later starts reuse
(see engine/converted.py, engine/machine_cache.py): the median is the second-start figure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import httpx

from bench.common import fmt, machine_info, markdown_table, write_report

SERVE_PORT = 8431
SERVED_NAME = "cold-start"
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


def _kvserve() -> list[str]:
    kvserve = shutil.which("kvserve")
    return [kvserve] if kvserve else [sys.executable, "-m", "service.cli"]


def command_for(mode: str, model: str, prompt: str, hf_python: str, port: int = SERVE_PORT) -> list[str]:
    """The command line whose first stdout byte (for `serve`: first answered completion) marks the first token."""
    if mode == "cli":
        return _kvserve() + ["generate", prompt, "--max-tokens", "1", "--model", model]
    if mode == "serve":
        return _kvserve() + ["serve", "--model", model, "--served-model-name", SERVED_NAME, "--port", str(port),
                             "--log-level", "warning"]
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


def time_to_first_served_token(cmd: list[str], port: int, prompt: str, timeout: float = 120.0) -> tuple[float, None]:
    """(seconds until a started server first answers a one-token completion, None): then it is stopped."""
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}")
                try:
                    response = client.post("/v1/completions", json=body)
                except httpx.HTTPError:  # not listening yet
                    response = None
                if response is not None and response.status_code == 200:
                    return time.perf_counter() - start, None
                if response is not None and response.status_code != 503:  # 503: still loading
                    raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
                time.sleep(0.02)
        raise RuntimeError(f"no completion from {' '.join(cmd[:4])} ... within {timeout:.0f} s")
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited by itself
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="registry name, GGUF file or HF dir")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--modes", default="cli,api,serve", help="comma-separated: cli, api, serve, transformers")
    parser.add_argument("--port", type=int, default=SERVE_PORT, help="for the serve mode")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hf-python", default=sys.executable, help="interpreter for the transformers mode")
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, dict] = {}
    for mode in modes:
        cmd = command_for(mode, args.model, args.prompt, args.hf_python, args.port)
        if mode == "serve":
            runs = [time_to_first_served_token(cmd, args.port, args.prompt) for _ in range(args.runs)]
        else:
            runs = [time_to_first_byte(cmd) for _ in range(args.runs)]
        firsts = [r[0] for r in runs]
        results[mode] = {"first_token_s": firsts, "exit_s": [r[1] for r in runs],
                         "median_s": statistics.median(firsts), "min_s": min(firsts)}
        print(f"{mode}: first token after {', '.join(f'{t:.2f}' for t in firsts)} s", flush=True)
    rows = [[mode, fmt(r["median_s"], 2), fmt(r["min_s"], 2),
             fmt(statistics.median(r["exit_s"]), 2) if None not in r["exit_s"] else "-"]
            for mode, r in results.items()]
    table = markdown_table(["mode", "first token s (median)", "min s", "process exit s"], rows)
    data = {"config": vars(args), "machine": machine_info(), "results": results}
    write_report(args.output, data, f"Cold start to first token, {args.runs} runs each\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
