"""The CPU matmul kernels: each weight format against a plain reference, and row independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.cpu_matmul import (
    amx_bf16_available,
    bf16_gemm_available,
    fbgemm_available,
    make_kernel,
    resolve_quantization,
)

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm runs on x86 builds of PyTorch only")
needs_bf16 = pytest.mark.skipif(not bf16_gemm_available(), reason="oneDNN bf16 GEMMs need AVX-512 bf16")


def available(quantization: str) -> bool:
    return {"none": True, "bf16": bf16_gemm_available()}.get(quantization, fbgemm_available())


def weights(out_features: int = 96, in_features: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=gen) * 0.1,
            torch.randn(out_features, generator=gen) * 0.01)


def activations(rows: int, in_features: int = 80, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=gen)
    x[::3] *= 40.0  # rows of very different scale, as the residual stream has
    x[1, 7] = 300.0  # and an outlier channel
    return x


def int8_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int8 scheme written out: 7-bit symmetric weights per output channel; each row scaled to max |x| = 1
    and quantized to 8 bits asymmetric over [-1, 1]."""
    w_scale = w.abs().amax(dim=1, keepdim=True) / 63
    w_q = torch.round(w / w_scale).clamp(-63, 63) * w_scale
    row_scale = x.abs().amax(dim=1, keepdim=True)
    step, zero_point = 2 / 255, 128
    x_q = (torch.clamp(torch.round(x / row_scale / step) + zero_point, 0, 255) - zero_point) * step
    return (x_q.double() @ w_q.double().T * row_scale.double() + b.double()).float()


def test_none_is_exact_fp32() -> None:
    w, b = weights()
    kernel = make_kernel(w, b, "none")
    x = activations(5)
    expected = F.linear(x, w, b)
    got = kernel(x) if kernel is not None else expected
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_fbgemm
def test_fp16_rounds_only_the_weights() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "fp16")(x)
    # Same as fp32 math over fp16-rounded weights, and clearly not the same as the unrounded ones.
    torch.testing.assert_close(got, F.linear(x, w.half().float(), b), rtol=1e-5, atol=1e-4)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-5


@needs_bf16
def test_bf16_rounds_weights_inputs_and_outputs() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "bf16")(x)
    # fp32 math over bf16-rounded operands, the sum rounded to bf16 once more.
    rounded = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    torch.testing.assert_close(got, rounded.bfloat16().float(), rtol=8e-3, atol=1e-3)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-3


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_bf16_rows_stay_independent_at_any_thread_count(threads: int) -> None:
    """oneDNN's reduction split depends on the thread count; the kernel must find safe blocks for each."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w, b = weights(out_features=576, in_features=1536, seed=threads)
        kernel = make_kernel(w, b, "bf16")
        x = activations(200, in_features=1536)
        alone = torch.cat([kernel(row) for row in x.split(1)])
        for size in (2, 17, 33, 48, 64, 65, 100, 129, 160, 200):
            assert torch.equal(kernel(x[:size]), alone[:size]), f"{size} rows change with their batch"
    finally:
        torch.set_num_threads(previous)


@needs_fbgemm
def test_int8_matches_the_written_out_scheme() -> None:
    w, b = weights()
    x = activations(7)
    got = make_kernel(w, b, "int8")(x)
    expected = int8_reference(x, w, b)
    exact = F.linear(x, w, b)
    scale = exact.abs().amax(dim=1, keepdim=True)
    # Within a rounding step of the reference, which itself is within a few percent of fp32.
    assert ((got - expected).abs() / scale).max() < 2e-3
    assert ((got - exact).abs() / scale).max() < 0.05


@pytest.mark.parametrize("quantization", ["none", "bf16", "fp16", "int8"])
def test_rows_do_not_depend_on_the_rest_of_the_batch(quantization: str) -> None:
    if not available(quantization):
        pytest.skip(f"{quantization} kernels need this CPU's support")
    w, b = weights(out_features=300, in_features=128)
    kernel = make_kernel(w, b, quantization)
    x = activations(250, in_features=128)
    together = kernel(x)
    for size in (1, 2, 3, 7, 14, 31, 32, 64, 121, 122, 127, 249):
        for start in (0, 1, 250 - size):
            part = slice(start, start + size)
            assert torch.equal(kernel(x[part]), together[part]), f"rows {part} change with their batch"


def test_resolve_quantization() -> None:
    cpu_auto = "bf16" if amx_bf16_available() else "fp16" if fbgemm_available() else "none"
    assert resolve_quantization("auto", "cpu", torch.float32) == cpu_auto
    assert resolve_quantization(None, "cpu", torch.float32) == cpu_auto
    assert resolve_quantization("auto", "cpu", torch.bfloat16) == "none"
    assert resolve_quantization("auto", "cuda", torch.bfloat16) == "none"
    assert resolve_quantization("none", "cpu", torch.float32) == "none"
    with pytest.raises(ValueError, match="CPU fp32"):
        resolve_quantization("int8", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantization("int4", "cpu", torch.float32)
