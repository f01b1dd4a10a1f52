"""Shared pieces of the benchmarks: the prompt set, statistics and report formatting."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path

PEERS_DIR = Path(os.environ.get("PEERS", Path.home() / ".cache" / "kvserve-peers"))
HF_MODEL_DIR = PEERS_DIR / "models" / "smollm2-135m-hf"

# Varied user questions; with SmolLM2's chat template (which adds its default system prompt) each
# becomes a prompt of about 40 tokens.
QUESTIONS = [
    "Why is the sky blue during the day but red at sunset?",
    "Write a short poem about a cat who learns to play the piano.",
    "Explain in simple words how a refrigerator keeps food cold.",
    "What are three good habits for writing clean Python code?",
    "Give me a recipe for a quick vegetable soup with lentils.",
    "How do bees communicate the location of flowers to each other?",
    "Summarize the plot of a heist movie set on a space station.",
    "What is the difference between weather and climate, briefly?",
    "List some tips for staying focused while studying at home.",
    "Describe how a bicycle gear system makes climbing hills easier.",
    "Why do we have leap years, and how often do they happen?",
    "Tell me a bedtime story about a dragon afraid of the dark.",
    "How does a compiler turn source code into a running program?",
    "What should I pack for a three day hiking trip in the mountains?",
    "Explain what photosynthesis is to a ten year old child.",
    "Compare trains and planes for travelling between two big cities.",
]


def chat_messages(index: int) -> list[dict]:
    """The index-th benchmark conversation (cycling through QUESTIONS)."""
    return [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]


def chat_prompt_ids(tokenizer, count: int) -> list[list[int]]:
    """`count` chat prompts as token ids, rendered with the model's chat template."""
    prompts = []
    for i in range(count):
        text = tokenizer.apply_chat_template(chat_messages(i), add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def random_prompt_ids(count: int, length: int, vocab_size: int, seed: int = 0,
                      avoid: Sequence[int] = ()) -> list[list[int]]:
    """`count` prompts of `length` random token ids (vLLM's `random` dataset idea), reproducible by seed."""
    rng = random.Random(seed)
    banned = set(avoid)
    prompts = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            token = rng.randrange(vocab_size)
            if token not in banned:
                ids.append(token)
        prompts.append(ids)
    return prompts


def warmup_prompts(prompts: Sequence[str | list[int]]) -> list:
    """Short heads of two prompts: warm-up requests that leave no full prompt block in a prefix cache."""
    return [p[:8] for p in prompts[:2]]


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    """kvserve's tokenizer for a registry name, GGUF file or HF dir (no model weights loaded)."""
    from engine.models_registry import resolve_model
    from engine.tokenizer import Tokenizer

    return Tokenizer.load(resolve_model(model))


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between ranks, as numpy's default; nan if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """mean, p50 and p99 of a list of samples (nan for an empty list)."""
    mean = sum(values) / len(values) if values else math.nan
    return {"mean": mean, "p50": percentile(values, 50), "p99": percentile(values, 99)}


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a markdown cell; '-' for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """Where a figure was taken: CPU model and the features kvserve's kernels depend on, load, platform, time."""
    from engine.cpu_features import detect

    info: dict[str, object] = {"cpu_model": cpu_model(), "cpu_features": detect().describe(), "cpus": os.cpu_count(),
                               "platform": platform.platform(), "python": platform.python_version(),
                               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict[str, object]) -> str:
    """One line for a report's head: CPU model, cores, features and load, e.g. for figures taken on a busy box."""
    return (f"CPU: {info.get('cpu_model')}, {info.get('cpus')} cores; features: {info.get('cpu_features')}; "
            f"load average {info.get('loadavg_1m', '-')}")


def _status_kb(pid: int | str, key: str) -> int:
    """A `VmXXX:  123 kB` field of /proc/PID/status, in kB (0 if absent or the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, via /proc/PID/task/*/children (Linux)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except OSError:
            continue
    return found + [d for child in found for d in _descendants(child)]


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process and its children, MB: now (VmRSS) and its peak so far (VmHWM).

    Servers such as vLLM run their model in child processes, so those are summed in; the peak sum is an
    upper bound (the children need not have peaked at once).
    """
    pids: list[int | str] = [pid] + (_descendants(int(pid)) if pid != "self" else [])
    return {"rss_mb": sum(_status_kb(p, "VmRSS") for p in pids) / 1024,
            "peak_mb": sum(_status_kb(p, "VmHWM") for p in pids) / 1024}


def run_isolated(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh Python process (spawned), returning its (picklable) result.

    Every system a benchmark compares runs alone in its own process, so none is slowed by another's
    threads, allocator state or memory left behind, and its RSS is its own.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def memory_table(systems: dict[str, dict]) -> str:
    """RSS at idle (loaded and warmed up, before the timed runs) and at peak per system that reports it."""
    rows = [[name, fmt(res["memory"].get("rss_idle_mb"), 0), fmt(res["memory"].get("peak_mb"), 0)]
            for name, res in systems.items() if isinstance(res, dict) and "memory" in res]
    return markdown_table(["system", "RSS idle MB", "RSS peak MB"], rows) if rows else ""


def write_report(path: str | None, data: dict, markdown: str) -> None:
    """Print the markdown; if `path` is given, also write `path` (JSON) and the markdown beside it (.md).

    The markdown is headed by the machine line when `data` has machine_info() under "machine".
    """
    if "machine" in data:
        markdown = machine_line(data["machine"]) + "\n\n" + markdown
    print(markdown)
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown + "\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")


def parse_int_list(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64] (argparse type)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values
