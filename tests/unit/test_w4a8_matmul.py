"""`--quantization int4-a8`: kvserve's 4-bit kernel with the rows quantized to 8 bits per group of 32
(csrc/integer_avx2.cpp's w4a8_tile, one AVX2 build for every x86 CPU with AVX2), a row's result independent of its
batch, and the format offered where that kernel runs and refused elsewhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers.integer_kernels import (
    AVX2,
    assert_non_finite_poisons_only_its_row,
    assert_rows_alone_equal_batched,
    eight_bit_rows,
    rows,
)
from test_w4a16_matmul import fp16_grid, weight_of

from engine.cpu_features import detect, report
from engine.models.cpu_matmul import format_refusal, make_kernel, resolve_quantization, rows_cost_arithmetic
from engine.models.w4a16_matmul import w4a8_kernel, w4a8_linear, w4a16_linear

needs_avx2 = pytest.mark.skipif(not AVX2, reason="the 8-bit-row kernel needs AVX2; its refusal is tested below")


def test_runs_exactly_where_the_cpu_has_avx2() -> None:
    assert (w4a8_kernel() is not None) == AVX2
    assert (format_refusal("int4-a8") is None) == AVX2
    assert ("int4-a8 matmuls (--quantization int4-a8): kvserve's integer kernel" in report()) == AVX2


@needs_avx2
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (48, 64), (576, 1536)])
@pytest.mark.parametrize("count", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_computes_the_product_with_8_bit_rows(out_features: int, in_features: int, count: int,
                                              with_bias: bool) -> None:
    groups = fp16_grid(out_features, in_features)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(3)) if with_bias else None
    x = rows(count, in_features)
    x[0, :32] = 0.0  # a group of zeros: scale 0
    got = w4a8_linear(groups, bias)(x).double()
    w = weight_of(groups)
    # the offsets meet the row's exact sum; the codes its 8-bit rounding
    low = groups.low.repeat_interleave(32, 1).double()
    want = eight_bit_rows(x) @ (w - low).T + x.double() @ low.T + (0 if bias is None else bias.double())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # what 8 bits cost against the exact product, and what 16 bits (the default) cost
    exact = x.double() @ w.T + (0 if bias is None else bias.double())
    error = ((got - exact).abs().max() / exact.abs().max()).item()
    sixteen = w4a16_linear(groups, bias, "avx2")(x).double()
    assert error < 0.03
    assert error > 10 * ((sixteen - exact).abs().max() / exact.abs().max()).item()


@needs_avx2
def test_a_row_is_the_same_bits_alone_and_in_any_batch() -> None:
    linear = w4a8_linear(fp16_grid(192, 1536), torch.randn(192))
    assert linear.batch_invariant
    assert_rows_alone_equal_batched(linear, rows(200, 1536), (2, 3, 4, 5, 7, 8, 9, 16, 17, 40, 70, 129, 200))


@needs_avx2
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_row_holding_inf_or_nan_gives_nan_and_leaves_the_others_alone(bad: float) -> None:
    linear = w4a8_linear(fp16_grid(192, 576), torch.randn(192))
    assert_non_finite_poisons_only_its_row(linear, 576, (1, 5, 20, 70), column=100, bad=bad)


@needs_avx2
def test_the_format_takes_weights_stored_in_4_bits_and_gives_the_rest_autos_format() -> None:
    groups = fp16_grid(64, 64)
    x = rows(3, 64)
    kernel, name = make_kernel(weight_of(groups).float(), None, "int4-a8", keep_4bit=True, grid=groups)
    assert name == "int4-a8" and torch.equal(kernel(x), w4a8_linear(groups, None)(x))
    _, rest = make_kernel(torch.randn(64, 64), None, "int4-a8", keep_4bit=True)  # not on a 4-bit grid
    assert rest == resolve_quantization("auto", "cpu", torch.float32)
    # each row costs its own arithmetic, so speculation checks one draft a step (engine/speculative.py)
    assert rows_cost_arithmetic("int4-a8+q8_0")


def test_refused_without_avx2_with_the_reason() -> None:
    without = dataclasses.replace(detect(), avx2=False)
    with pytest.raises(ValueError, match="int4-a8 needs an x86 CPU with AVX2"):
        resolve_quantization("int4-a8", "cpu", torch.float32, without)
    assert "--quantization int4-a8: refused: needs an x86 CPU with AVX2" in report(without)
    with pytest.raises(ValueError, match="CPU fp32 kernel"):
        resolve_quantization("int4-a8", "cuda", torch.float16)


@needs_avx2
def test_a_model_of_4_bit_weights_served_with_it_gives_each_request_its_output_alone(tmp_path: Path) -> None:
    """End to end on a tiny Llama whose projections are on 4-bit grids (as a Q4 GGUF's dequantize): those on the
    8-bit-row kernel, prompts arriving while others decode (chunked prefills beside decode rows, prefix-cache
    hits), each greedy output what it is alone."""
    from helpers.tiny_engine import make_tiny_model_dir
    from safetensors.torch import load_file, save_file
    from test_cpu_matmul import four_bit_weight
    from test_engine import alone, assert_all_free, make_engine, random_prompts, run_all

    from engine import SamplingParams

    path = make_tiny_model_dir(tmp_path)
    tensors = load_file(f"{path}/model.safetensors")
    for i, name in enumerate(sorted(name for name in tensors if name.endswith("proj.weight"))):
        tensors[name] = four_bit_weight(*tensors[name].shape, seed=i)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    engine = make_engine(path, quantization="int4-a8", batch_invariant=True)
    assert engine.quantization.split("+")[0] == "int4-a8"
    prompts = random_prompts(24, seed=4, vocab=engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [alone(engine, ids, params) for ids in prompts]
    groups = [[(f"r{i}", prompts[i], params) for i in range(start, start + 8)] for start in range(0, 24, 8)]
    got = run_all(engine, groups, steps_between=3)
    assert [got[f"r{i}"] for i in range(24)] == expected
    assert_all_free(engine)
