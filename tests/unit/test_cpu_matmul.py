"""The CPU matmul kernels: each weight format against a plain reference, and row independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.cpu_formats import runs_here

from engine.cpu_features import CpuFeatures, detect, report
from engine.models.cpu_matmul import format_refusal, keeps_4bit, make_kernel, resolve_quantization
from engine.models.int4_matmul import GROUP, four_bit_groups


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
    kernel, _ = make_kernel(w, b, "none")
    x = activations(5)
    expected = F.linear(x, w, b)
    got = kernel(x) if kernel is not None else expected
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@runs_here("fp16")
def test_fp16_rounds_only_the_weights() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "fp16")[0](x)
    # Same as fp32 math over fp16-rounded weights, and clearly not the same as the unrounded ones.
    torch.testing.assert_close(got, F.linear(x, w.half().float(), b), rtol=1e-5, atol=1e-4)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-5


@runs_here("bf16")
def test_bf16_rounds_weights_inputs_and_outputs() -> None:
    w, b = weights()
    x = activations(5)
    got = make_kernel(w, b, "bf16")[0](x)
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
        kernel, _ = make_kernel(w, b, "bf16")
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
    got = make_kernel(w, b, "int8")[0](x)
    expected = int8_reference(x, w, b)
    exact = F.linear(x, w, b)
    scale = exact.abs().amax(dim=1, keepdim=True)
    # Within a rounding step of the reference, which itself is within a few percent of fp32.
    assert ((got - expected).abs() / scale).max() < 2e-3
    assert ((got - exact).abs() / scale).max() < 0.05


@pytest.mark.parametrize("quantization", ["none", "bf16", "fp16", "int8", "int4"])
def test_rows_do_not_depend_on_the_rest_of_the_batch(quantization: str) -> None:
    if reason := format_refusal(quantization):
        pytest.skip(f"{quantization} is refused on this CPU: {reason}")
    w, b = weights(out_features=320, in_features=128)
    kernel, used = make_kernel(w, b, quantization)
    assert used == quantization or (quantization == "none" and kernel is None)
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
    (ARM, "none", {"bf16": "AVX-512 bf16", "fp16": "fbgemm", "int8": "fbgemm", "int4": "AVX2", "int4-a8": "AVX2"}),
])
def test_each_cpu_kind_picks_and_refuses_formats(features: CpuFeatures, auto: str, refused: dict[str, str]) -> None:
    """bf16 runs only with AMX: without it oneDNN's bf16 GEMM sums a row differently with the batch size."""
    assert resolve_quantization("auto", "cpu", torch.float32, features) == auto
    for name in ("none", "bf16", "fp16", "int8", "int4", "int4-a8"):
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
        resolve_quantization("int3", "cpu", torch.float32)


def four_bit_weight(out_features: int = 64, in_features: int = 128, seed: int = 3) -> torch.Tensor:
    """Weights as a GGUF's 4-bit tensors dequantize: per group of 32, low + q * step with q in 0..15.

    Like Q4_1, most groups use all 16 levels; like Q4_0 and Q4_K, some never reach level 15 (their top
    is level 9 or 12), and one group is constant.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP
    q = torch.randint(0, 16, (out_features, groups, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # the group's extremes sit on levels 0 and 15 ...
    q[::5, 0] = q[::5, 0].clamp(max=9)  # ... except here (top level 9)
    q[1::5, 1] = q[1::5, 1].clamp(max=12)  # and here (top level 12)
    q[2, 0] = 0  # a constant group
    step = torch.rand(out_features, groups, 1, generator=gen) * 0.02 + 0.001
    low = -8 * step + torch.randn(out_features, groups, 1, generator=gen) * 0.01
    return (low + q * step).reshape(out_features, in_features)


def test_four_bit_grids_are_found_again_exactly() -> None:
    w = four_bit_weight()
    groups = four_bit_groups(w)
    assert groups is not None
    q = groups.q.reshape(w.shape[0], -1, GROUP).float()
    rebuilt = (groups.low[..., None] + q * groups.step[..., None]).reshape(w.shape)
    torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-6)
    noisy = w.clone()
    noisy[7, 40] += 0.3 * groups.step[7, 1]  # one weight between two levels
    assert four_bit_groups(noisy) is None
    assert four_bit_groups(weights(out_features=64, in_features=128)[0]) is None


@runs_here("int4")
def test_int4_is_bf16_math_over_the_same_grid() -> None:
    """auto keeps 4-bit weights 4-bit; the only rounding is bf16 activations, scales, offsets and results."""
    w, b = four_bit_weight(), torch.randn(64, generator=torch.Generator().manual_seed(4)) * 0.01
    kernel, used = make_kernel(w, b, "fp16", keep_4bit=True)
    assert used == "int4"
    x = activations(6, in_features=128)
    got = kernel(x)
    groups = four_bit_groups(w)
    step, zero = groups.step.bfloat16().double(), (groups.low + 8 * groups.step).bfloat16().double()
    q = groups.q.reshape(64, -1, GROUP).double()
    w_kernel = ((q - 8) * step[..., None] + zero[..., None]).reshape(w.shape)
    expected = (x.bfloat16().double() @ w_kernel.T).bfloat16().double() + b.double()
    scale = expected.abs().amax(dim=1, keepdim=True)
    assert ((got.double() - expected).abs() / scale).max() < 1e-2
    exact = F.linear(x, w, b)
    assert ((got - exact).abs() / scale.float()).max() < 3e-2  # bf16-sized, not a 4-bit rounding


@runs_here("int4")
def test_weights_off_a_four_bit_grid_are_rounded_only_when_asked() -> None:
    w, b = weights(out_features=64, in_features=128)
    assert make_kernel(w, b, "fp16", keep_4bit=True)[1] == "fp16"  # auto: not 4-bit in the file, stays fp16
    kernel, used = make_kernel(w, b, "int4")
    assert used == "int4"
    x = activations(4, in_features=128)
    exact = F.linear(x, w, b)
    error = ((kernel(x) - exact).abs() / exact.abs().amax(dim=1, keepdim=True)).max()
    assert 1e-3 < error < 0.2  # a 4-bit rounding: lossy, but the same function
    odd, _ = weights(out_features=40, in_features=80)  # shapes the kernel cannot pack get fp16
    assert make_kernel(odd, None, "int4")[1] == "fp16"


def test_auto_keeps_4bit_weights_only_on_cpu_fp32() -> None:
    assert keeps_4bit("auto", "cpu", torch.float32, AMD_ZEN4)
    assert keeps_4bit(None, "cpu", torch.float32, AVX2_ONLY)
    assert not keeps_4bit("fp16", "cpu", torch.float32, AMD_ZEN4)  # an explicit format is used throughout
    assert not keeps_4bit("auto", "cpu", torch.float32, ARM)
    assert not keeps_4bit("auto", "cuda", torch.float32, AMD_ZEN4)
    assert not keeps_4bit("auto", "cpu", torch.bfloat16, INTEL_AMX)
