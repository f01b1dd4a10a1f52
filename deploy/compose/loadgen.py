"""Bounded demo traffic for docker-compose so the Grafana dashboard has something to show.

Standard library only (it runs in the kvserve image). Sends LOADGEN_REQUESTS completions at
LOADGEN_CONCURRENCY, one in twenty deliberately invalid (to fill the error panel), then exits.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

URL = os.environ.get("KVSERVE_URL", "http://kvserve:8000").rstrip("/")
API_KEY = os.environ.get("KVSERVE_API_KEY", "")
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three colours.",
    "What is the capital of France?",
    "Tell me a short story about a robot.",
]


def send(i: int) -> int:
    """One completion request; returns the HTTP status."""
    rng = random.Random(i)
    body = {"model": os.environ.get("KVSERVE_MODEL_NAME", "smollm2-135m"), "prompt": rng.choice(PROMPTS),
            "max_tokens": rng.randint(8, 64), "temperature": 0.7}
    if i % 20 == 19:
        body["temperature"] = -1  # invalid on purpose: shows up as a 400 on the dashboard
    headers = {"Content-Type": "application/json"}
    if API_KEY:
        headers["Authorization"] = f"Bearer {API_KEY}"
    req = urllib.request.Request(f"{URL}/v1/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def main() -> None:
    total = int(os.environ.get("LOADGEN_REQUESTS", "300"))
    concurrency = int(os.environ.get("LOADGEN_CONCURRENCY", "4"))
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(send, range(total)))
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"loadgen: {total} requests in {time.monotonic() - started:.0f}s, statuses {counts}", flush=True)


if __name__ == "__main__":
    main()
