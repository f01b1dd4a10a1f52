"""The CPU matmul kernels: each weight format against a plain reference, and row independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.cpu_formats import runs_here

from engine.cpu_features import CpuFeatures, detect, report
from engine.models.cpu_matmul import format_refusal, make_kernel, resolve_quantization


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


@runs_here("fp16")
def test_fp16_rounds_only_the_weights() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "fp16")(x)
    # Same as fp32 math over fp16-rounded weights, and clearly not the same as the unrounded ones.
    torch.testing.assert_close(got, F.linear(x, w.half().float(), b), rtol=1e-5, atol=1e-4)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-5


@runs_here("bf16")
def test_bf16_rounds_weights_inputs_and_outputs() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "bf16")(x)
    # fp32 math over bf16-rounded operands, the sum rounded to bf16 once more.
    rounded = F.linear(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    torch.testing.assert_close(got, rounded.bfloat16().float(), rtol=8e-3, atol=1e-3)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-3


@runs_here("bf16")
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


@runs_here("int8")
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
    if reason := format_refusal(quantization):
        pytest.skip(f"{quantization} is refused on this CPU: {reason}")
    w, b = weights(out_features=300, in_features=128)
    kernel = make_kernel(w, b, quantization)
    x = activations(250, in_features=128)
    together = kernel(x)
    for size in (1, 2, 3, 7, 14, 31, 32, 64, 121, 122, 127, 249):
        for start in (0, 1, 250 - size):
            part = slice(start, start + size)
            assert torch.equal(kernel(x[part]), together[part]), f"rows {part} change with their batch"


# The CPU kinds CI runs on, as engine.cpu_features.detect() reports them.
INTEL_AMX = CpuFeatures(amx=True, avx512_bf16=True, vnni=True, avx2=True, fbgemm=True)
AMD_ZEN4 = CpuFeatures(amx=False, avx512_bf16=True, vnni=True, avx2=True, fbgemm=True)
AVX2_ONLY = CpuFeatures(amx=False, avx512_bf16=False, vnni=False, avx2=True, fbgemm=True)
ARM = CpuFeatures(amx=False, avx512_bf16=False, vnni=False, avx2=False, fbgemm=False)


@pytest.mark.parametrize(("features", "auto", "refused"), [
    (INTEL_AMX, "bf16", {}),
    (AMD_ZEN4, "fp16", {"bf16": "needs AMX"}),
    (AVX2_ONLY, "fp16", {"bf16": "AVX-512 bf16"}),
    (ARM, "none", {"bf16": "AVX-512 bf16", "fp16": "fbgemm", "int8": "fbgemm"}),
])
def test_each_cpu_kind_picks_and_refuses_formats(features: CpuFeatures, auto: str, refused: dict[str, str]) -> None:
    """bf16 runs only with AMX: without it oneDNN's bf16 GEMM sums a row differently with the batch size."""
    assert resolve_quantization("auto", "cpu", torch.float32, features) == auto
    for name in ("none", "bf16", "fp16", "int8"):
        if name in refused:
            with pytest.raises(ValueError, match=f"quantization={name} .*{refused[name]}"):
                resolve_quantization(name, "cpu", torch.float32, features)
        else:
            assert resolve_quantization(name, "cpu", torch.float32, features) == name
    if "bf16" in refused:  # a whole bf16 model runs the same GEMM
        with pytest.raises(ValueError, match=f"dtype=bfloat16 on CPU .*{refused['bf16']}.*auto picks {auto}"):
            resolve_quantization("auto", "cpu", torch.bfloat16, features)
    else:
        assert resolve_quantization("auto", "cpu", torch.bfloat16, features) == "none"
    assert resolve_quantization("auto", "cuda", torch.bfloat16, features) == "none"  # CUDA: dtype decides


def test_this_cpu_refuses_what_its_features_rule_out() -> None:
    """The engine's answer on the machine running the tests, and the report CI prints at the start of its log."""
    features = detect()
    text = report()
    assert text.startswith("CPU features: ")
    bf16_refused = format_refusal("bf16") is not None
    assert bf16_refused == (not features.amx)
    assert ("--quantization bf16: refused" in text) == bf16_refused
    assert ("--dtype bfloat16: refused" in text) == bf16_refused
    if bf16_refused:
        with pytest.raises(ValueError, match="AMX"):
            resolve_quantization("bf16", "cpu", torch.float32)


def test_resolve_quantization() -> None:
    assert resolve_quantization("none", "cpu", torch.float32) == "none"
    with pytest.raises(ValueError, match="CPU fp32"):
        resolve_quantization("int8", "cuda", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantization("int4", "cpu", torch.float32)
