"""Driver: start each server in turn (kvserve, vLLM CPU, llama.cpp), wait for health, benchmark it, stop it.

Runs the serving benchmark (bench.serve_bench) and, with --offline, the offline-style throughput
(bench.offline_throughput's OpenAI mode) against every server, so all figures come from one sitting with
the same prompts and the same client. Peers are started with ../shared/peers/serve.sh (set PEERS_SH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import offline_throughput, serve_bench
from bench.common import (
    HF_MODEL_DIR,
    PEERS_DIR,
    QUESTIONS,
    fmt,
    machine_info,
    markdown_table,
    memory_table,
    parse_int_list,
    process_memory,
    write_report,
)

PEERS_SH = Path(os.environ.get("PEERS_SH", Path(__file__).resolve().parents[2] / "shared" / "peers" / "serve.sh"))
SERVERS = ("kvserve", "kvserve-nospec", "kvserve-sdpa", "kvserve-fp16", "kvserve-int8", "kvserve-a8", "kvserve-bf16", "vllm", "vllm-bf16",
           "llama")
# kvserve variants: extra `serve` options. The default keeps the GGUF's 4-bit weights int4 and speculates with
# n-grams while at most 2 sequences run; kvserve-nospec does not speculate; kvserve-sdpa neither, and its decode
# attention gathers KV blocks for PyTorch's SDPA instead of kvserve's paged kernel (the path before the kernel);
# kvserve-fp16 has every weight in fp16 (faster at 64 rows); kvserve-bf16 runs the whole model in bf16 (fast with AMX);
# kvserve-a8 multiplies the 4-bit weights by 8-bit activations, as llama.cpp does (opt-in, lossier).
KVSERVE_VARIANTS = {"kvserve": [], "kvserve-nospec": ["--speculative-config", "off"],
                    "kvserve-sdpa": ["--speculative-config", "off", "--attention-backend", "sdpa"],
                    "kvserve-fp16": ["--quantization", "fp16"], "kvserve-int8": ["--quantization", "int8"],
                    "kvserve-a8": ["--quantization", "int4-a8"], "kvserve-bf16": ["--dtype", "bfloat16"]}


def default_servers() -> str:
    from engine.models.cpu_matmul import format_refusal

    amx = format_refusal("bf16") is None  # a bf16 model runs (on AMX) only where bf16 is not refused
    return ",".join(["kvserve", "kvserve-nospec", "kvserve-sdpa", "kvserve-fp16"] + ["kvserve-bf16"] * amx + ["vllm"]
                    + ["vllm-bf16"] * amx + ["llama"])


def vllm_bf16_command(port: int) -> list[str]:
    """serve.sh's vLLM, but in bf16 (vLLM's own default for this model): the fair peer for kvserve-bf16."""
    vllm = PEERS_DIR / "vllm"
    env = [f"LD_PRELOAD={vllm / 'lib' / 'libiomp5.so'}", f"VLLM_CPU_OMP_THREADS_BIND=0-{(os.cpu_count() or 1) - 1}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU=0", "VLLM_CPU_KVCACHE_SPACE=4"]
    return ["env", *env, str(vllm / "bin" / "vllm"), "serve", str(HF_MODEL_DIR),
            "--served-model-name", "smollm2-135m", "--dtype", "bfloat16", "--max-model-len", "2048",
            "--host", "127.0.0.1", "--port", str(port)]


def llama_command(port: int) -> list[str] | None:
    """serve.sh's llama.cpp server, from $LLAMA_CPP_DIR when set (None: serve.sh's own build).

    setup.sh builds llama.cpp with GGML_NATIVE, which on some AMX VMs dies at start with an invalid opcode
    in ggml's AMX code; bench/README.md says how to build one without AMX and point LLAMA_CPP_DIR at it.
    """
    llama_dir = os.environ.get("LLAMA_CPP_DIR")
    if not llama_dir:
        return None
    return ["env", f"LD_LIBRARY_PATH={llama_dir}", str(Path(llama_dir) / "llama-server"),
            "-m", str(PEERS_DIR / "models" / "smollm2-135m.gguf"), "--alias", "smollm2-135m", "-c", "32768",
            "-np", "16", "-t", str(os.cpu_count() or 1), "--host", "127.0.0.1", "--port", str(port), "--metrics"]


def server_command(name: str, port: int, model: str) -> list[str]:
    """The command line that serves the default model on 127.0.0.1:port."""
    if name in KVSERVE_VARIANTS:
        return [sys.executable, "-m", "service.cli", "serve", "--model", model, "--port", str(port),
                "--served-model-name", "smollm2-135m", "--log-level", "warning", *KVSERVE_VARIANTS[name]]
    if name == "vllm-bf16":
        return vllm_bf16_command(port)
    if name == "llama" and (command := llama_command(port)):
        return command
    if name in ("vllm", "llama"):
        return ["bash", str(PEERS_SH), name, str(port)]
    raise ValueError(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")


def is_up(base: str) -> bool:
    """True when /health and /v1/models both answer 200 (llama.cpp answers 503 while loading)."""
    try:
        return all(httpx.get(f"{base}{path}", timeout=5).status_code == 200 for path in ("/health", "/v1/models"))
    except httpx.HTTPError:
        return False


def start_server(name: str, port: int, model: str, log_dir: Path, timeout: float) -> subprocess.Popen:
    """Start one server in its own process group; return once it is healthy (or raise with its log tail)."""
    base = f"http://127.0.0.1:{port}"
    if is_up(base):
        raise RuntimeError(f"something already serves on {base}; pick another --port")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(server_command(name, port, model), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    print(f"started {name} (pid {proc.pid}), waiting for {base}/health; log {log_path}", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        if is_up(base):
            print(f"{name} up after {timeout - (deadline - time.monotonic()):.0f} s", flush=True)
            return proc
        time.sleep(2)
    stop_server(proc)
    raise RuntimeError(f"{name} not healthy after {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group (vLLM has child processes), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_VLLM_BENCH_KEYS = {"output_tok_s": r"Output token throughput \(tok/s\):\s*([\d.]+)",
                    "ttft_p50_ms": r"Median TTFT \(ms\):\s*([\d.]+)", "ttft_p99_ms": r"P99 TTFT \(ms\):\s*([\d.]+)",
                    "itl_p50_ms": r"Median ITL \(ms\):\s*([\d.]+)", "itl_p99_ms": r"P99 ITL \(ms\):\s*([\d.]+)"}


def parse_vllm_bench(text: str) -> dict[str, float]:
    """The headline figures of `vllm bench serve`'s printed summary."""
    found = {key: re.search(pattern, text) for key, pattern in _VLLM_BENCH_KEYS.items()}
    return {key: float(match.group(1)) for key, match in found.items() if match}


def vllm_bench_serve(port: int, concurrency: int, num_prompts: int, args: argparse.Namespace) -> dict[str, float]:
    """vLLM's own client (`vllm bench serve`, random dataset) against the server on `port`."""
    cmd = [str(PEERS_DIR / "vllm" / "bin" / "vllm"), "bench", "serve", "--backend", "openai",
           "--base-url", f"http://127.0.0.1:{port}", "--model", "smollm2-135m",
           "--tokenizer", str(PEERS_DIR / "models" / "smollm2-135m-hf"), "--dataset-name", "random",
           "--random-input-len", str(args.vllm_input_len), "--random-output-len", str(args.max_tokens),
           "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"vllm bench serve failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return parse_vllm_bench(done.stdout)


def bench_one(name: str, args: argparse.Namespace, prompts: list, levels: list[tuple[int, int]]) -> dict:
    """Start `name`, run the selected benchmarks against it, stop it."""
    proc = start_server(name, args.port, args.model, Path(args.log_dir), args.start_timeout)
    url = f"http://127.0.0.1:{args.port}"
    idle = process_memory(proc.pid)  # the server and its children (vLLM's engine core), loaded, no requests yet
    try:
        result: dict = {"serve": asyncio.run(serve_bench.run_bench(url, prompts, levels, args.max_tokens,
                                                                    args.ignore_eos, api_key=args.api_key,
                                                                    repeats=args.repeats))}
        if args.offline:
            try:
                result["offline"] = offline_throughput.run_openai(url, prompts, args.batch_sizes,
                                                                  args.max_tokens, args.api_key)
            except (RuntimeError, httpx.HTTPError) as exc:  # keep the serving figures
                print(f"{name} offline: {exc}", file=sys.stderr, flush=True)
                result["offline_error"] = str(exc)
        if args.vllm_bench and name == "kvserve":
            try:
                result["vllm_bench"] = {str(c): vllm_bench_serve(args.port, c, n, args) for c, n in levels}
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # keep kvserve's own figures
                print(f"vllm bench serve: {exc}", file=sys.stderr, flush=True)
                result["vllm_bench_error"] = str(exc)
        result["memory"] = {"rss_idle_mb": idle["rss_mb"], "peak_mb": process_memory(proc.pid)["peak_mb"]}
        return result
    finally:
        stop_server(proc)


def vllm_bench_table(results: dict[str, dict]) -> str:
    """`vllm bench serve` figures, one row per (server, concurrency)."""
    rows = [[name, conc] + [fmt(figures.get(key)) for key in _VLLM_BENCH_KEYS]
            for name, result in results.items() for conc, figures in result.get("vllm_bench", {}).items()]
    return markdown_table(["server", "conc", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
                          rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default=None,
                        help=f"comma-separated, from {SERVERS} (default: all; the bf16 ones only on CPUs with AMX)")
    parser.add_argument("--port", type=int, default=8123, help="port every server is started on, in turn")
    parser.add_argument("--model", default="smollm2-135m", help="kvserve's --model (peers serve SmolLM2)")
    parser.add_argument("--start-timeout", type=float, default=900.0,
                        help="seconds to wait for health (vLLM's first start compiles for minutes)")
    parser.add_argument("--offline", action="store_true", help="also measure offline-style batch throughput")
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 16, 64], help="for --offline")
    parser.add_argument("--offline-baseline", default=None, metavar="JSON",
                        help="bench.offline_throughput output (kvserve in-process + transformers) to merge in")
    parser.add_argument("--vllm-bench", action="store_true", help="also run `vllm bench serve` against kvserve")
    serve_bench.add_arguments(parser)
    parser.add_argument("--log-dir", default="artifacts/bench/logs")
    parser.add_argument("--output", default="artifacts/bench/peers.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in (args.servers or default_servers()).split(",") if n.strip()]
    for name in names:
        server_command(name, args.port, args.model)  # unknown names fail before anything starts
    levels = serve_bench.levels_from(args.concurrency, args.num_prompts)
    prompts = serve_bench.make_prompts(args, max([n for _, n in levels] + args.batch_sizes))
    # vllm bench serve's random prompts get the length of ours, so its figures compare with ours
    lengths = [len(p) for p in serve_bench.prompt_ids(args, len(QUESTIONS))]
    args.vllm_input_len = round(sum(lengths) / len(lengths))
    results: dict[str, dict] = {}
    for name in names:
        try:
            results[name] = bench_one(name, args, prompts, levels)
        except (RuntimeError, OSError, httpx.HTTPError) as exc:  # one broken peer must not lose the others' figures
            print(f"{name}: {exc}", file=sys.stderr, flush=True)
            results[name] = {"error": str(exc)}
    ok = {name: r for name, r in results.items() if "serve" in r}
    sections = [f"Serving ({args.dataset} prompts, {args.max_tokens} output tokens, streaming)\n\n"
                + serve_bench.serving_table({name: r["serve"] for name, r in ok.items()})]
    if args.offline:
        systems = {}
        if args.offline_baseline:
            systems.update(json.loads(Path(args.offline_baseline).read_text())["systems"])
        systems.update({f"{name} (HTTP)": r["offline"] for name, r in ok.items() if "offline" in r})
        reference = "kvserve" if "kvserve" in systems else "kvserve (HTTP)"
        sections.append("Offline-style throughput, output tok/s\n\n"
                        + offline_throughput.throughput_table(systems, args.batch_sizes, reference))
    if memory := memory_table(ok):
        sections.append("Server resident memory (process and children; peak after all the runs above)\n\n" + memory)
    if any("vllm_bench" in r for r in ok.values()):
        sections.append("`vllm bench serve` (random dataset)\n\n" + vllm_bench_table(ok))
    failed = [f"{name}: failed, see {args.log_dir}/{name}.log" for name, r in results.items() if "error" in r]
    data = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "machine": machine_info(),
            "results": results}
    write_report(args.output, data, "\n\n".join(sections + failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
