"""Startup honesty: a KV cache too small for --max-model-len lowers it, says so, and /v1/models reports it."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from live_server import MODEL_PATH, SERVED_NAME, start_server

pytestmark = pytest.mark.slow

ASKED = 512
BLOCKS = 13  # of 16 tokens: 208 fit


def test_context_lowered_to_what_the_kv_cache_holds_is_warned_and_reported() -> None:
    if not MODEL_PATH.is_file():
        pytest.skip(f"model file {MODEL_PATH} not found")
    from engine.runner import kv_bytes_per_block
    from engine.weights import read_model_config

    per_block = kv_bytes_per_block(read_model_config(str(MODEL_PATH)), torch.float32, 16)
    server = start_server("--kv-cache-bytes", str(BLOCKS * per_block + per_block // 2), "--max-model-len", str(ASKED),
                          "--max-num-seqs", "4", "--max-num-batched-tokens", "256")
    try:
        models = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(SERVED_NAME, BLOCKS * 16)]
        too_long = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                              json={"model": SERVED_NAME, "prompt": [7] * (BLOCKS * 16 + 1), "max_tokens": 1})
        assert too_long.status_code == 400 and str(BLOCKS * 16) in too_long.json()["error"]["message"]
    finally:
        assert server.stop() == 0
    warnings = [json.loads(line) for line in server.log_text().splitlines()
                if line.startswith("{") and "max_model_len lowered" in line]
    assert len(warnings) == 1, server.log_text()[-3000:]
    [warning] = warnings
    assert warning["level"] == "warning"
    assert warning["max_model_len_asked"] == ASKED and warning["max_model_len"] == BLOCKS * 16
    assert f"{ASKED} asked (--max-model-len)" in warning["message"]
    assert f"raise --kv-cache-bytes to at least {ASKED // 16 * per_block}" in warning["message"]
