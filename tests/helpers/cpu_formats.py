"""Which CPU weight formats this machine runs, from the engine's own detection (engine/cpu_features.py).

Tests choose their expectations here: a format the engine offers on this CPU must keep its promises; one
it refuses must be refused, with the reason naming the missing feature.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import pytest

from engine.models.cpu_matmul import format_refusal

T = TypeVar("T")


def refusal(dtype: str, quantization: str) -> str | None:
    """Why the engine refuses this CPU dtype and quantization here (None: it runs them)."""
    if dtype == "bfloat16":
        return format_refusal("bf16")
    return None if quantization == "auto" else format_refusal(quantization)


def runs_here(quantization: str) -> pytest.MarkDecorator:
    """Skip a kernel test of a format this CPU refuses (its refusal is tested in test_cpu_matmul.py)."""
    reason = format_refusal(quantization)
    return pytest.mark.skipif(reason is not None, reason=f"{quantization} is refused on this CPU: {reason}")


def build_or_expect_refusal(build: Callable[[], T], dtype: str, quantization: str) -> T:
    """build() where this CPU runs the format; where it does not, check that build() refuses it, then skip."""
    reason = refusal(dtype, quantization)
    if reason is None:
        return build()
    with pytest.raises(ValueError, match=re.escape(reason)):
        build()
    pytest.skip(f"refused on this CPU, as expected: {reason}")
