"""Start live kvserve servers on 127.0.0.1 as subprocesses (`python -m service.cli serve`) and read them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL_PATH = Path(os.environ.get("KVSERVE_TEST_MODEL",
                                 Path.home() / ".cache" / "kvserve" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
API_KEY = "test-key-123"
SERVED_NAME = "smollm2-test"
REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240  # the 2-core CI box is shared; loading the GGUF can take a while there


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A running `kvserve serve` subprocess."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", key)
            if match is None or match.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += value
        return total

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(*extra_args: str, model: Path | None = None, env: dict[str, str] | None = None,
                 poll_interval: float = 0.5) -> LiveServer:
    """Start a server (of the test GGUF, or `model`) on a free port and wait until /ready says 200, asking every
    `poll_interval` seconds; `env` adds environment variables."""
    if model is None and not MODEL_PATH.is_file():
        pytest.skip(f"model file {MODEL_PATH} not found (run `kvserve pull smollm2-135m`)")
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="kvserve-test-", suffix=".log", delete=False)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("KVSERVE_")}
    child_env |= {"PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "service.cli", "serve", "--model", str(model or MODEL_PATH), "--port", str(port),
               "--served-model-name", SERVED_NAME, *extra_args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    server = LiveServer(process, f"http://127.0.0.1:{port}", Path(log_file.name))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(poll_interval)
    server.stop()
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{server.log_text()[-4000:]}")
