"""kvserve's paged decode-attention kernel (engine/paged_decode.py): exact against a float64 reference, rows
independent of their batch and of the thread count, the same logits as the gather + SDPA path on a served
model, and a clear fallback where it cannot be built."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.integer_kernels import FLAGS, cpu_flags
from helpers.tiny_engine import make_tiny_model_dir
from helpers.tiny_models import save_hf, tiny_llama

from engine import native, paged_decode
from engine.attention import AttentionSpec
from engine.llm import LLM
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.weights import load_model

BLOCK = 4


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: list[list[int]],
              lens: list[int], spec: AttentionSpec) -> torch.Tensor:
    """Attention written out in float64, one row at a time."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.empty(rows, heads, head_dim, dtype=torch.float64)
    for row, (table, length) in enumerate(zip(tables, lens, strict=True)):
        first = max(0, length - spec.window) if spec.window else 0
        positions = [p for p in range(first, length) if table[p // BLOCK] >= 0]
        keys = torch.stack([k_cache[table[p // BLOCK], p % BLOCK] for p in positions]).double()  # (K, KVH, D)
        values = torch.stack([v_cache[table[p // BLOCK], p % BLOCK] for p in positions]).double()
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = keys[:, kv] @ q[row, head].double() * spec.scale
            if spec.softcap:
                scores = spec.softcap * torch.tanh(scores / spec.softcap)
            out[row, head] = scores.softmax(0) @ values[:, kv]
    return out


def random_case(rows: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0, freed: bool = False):
    """A cache of shuffled blocks, rows of different lengths; with `freed`, each row's first block given back."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    lens = torch.randint(1, 21, (rows,), generator=gen).tolist()
    tables, taken = [], 0
    for length in lens:
        count = -(-length // BLOCK)
        tables.append(order[taken:taken + count])
        taken += count
        if freed and count > 2:
            tables[-1][0] = -1
    q = torch.randn(rows, heads, head_dim, generator=gen)
    return q, k_cache, v_cache, tables, lens


def run(q, k_cache, v_cache, tables, lens, spec) -> torch.Tensor:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return paged_decode.decode_attention(q, k_cache, v_cache, padded, torch.tensor(lens, dtype=torch.int32), spec)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_hf(tiny_llama(), tmp_path_factory.mktemp("llama"))


def runner_for(path: str, dtype: torch.dtype = torch.float32, **options) -> ModelRunner:
    model, cfg = load_model(path, "cpu", dtype, max_positions=64, progress=False)
    return ModelRunner.for_testing(model, cfg, dtype=dtype, block_size=BLOCK, num_blocks=32, **options)


@pytest.fixture(autouse=True)
def kernel_built() -> None:
    if reason := native.unavailable_reason():
        pytest.fail(f"the kernel should build on the test machines (they have g++): {reason}")


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 2, 80), (4, 1, 8), (2, 1, 100)])
def test_matches_float64_reference(heads: int, kv_heads: int, head_dim: int) -> None:
    q, k_cache, v_cache, tables, lens = random_case(7, heads, kv_heads, head_dim)
    spec = AttentionSpec(0, head_dim ** -0.5)
    got = run(q, k_cache, v_cache, tables, lens, spec)
    torch.testing.assert_close(got.double(), reference(q, k_cache, v_cache, tables, lens, spec), rtol=1e-5, atol=1e-5)


def test_bf16_cache_is_read_exactly_and_the_output_keeps_the_query_dtype() -> None:
    q, k_cache, v_cache, tables, lens = random_case(5, 9, 3, 64, seed=5)
    k16, v16 = k_cache.bfloat16(), v_cache.bfloat16()
    spec = AttentionSpec(0, 0.125)
    got = run(q, k16, v16, tables, lens, spec)  # fp32 queries: fp32 out, from the bf16 values widened
    torch.testing.assert_close(got.double(), reference(q, k16.float(), v16.float(), tables, lens, spec),
                               rtol=1e-5, atol=1e-5)
    # the same sums as over an fp32 cache holding those values: the kernel widens the rows once, exactly
    assert torch.equal(got, run(q, k16.float(), v16.float(), tables, lens, spec))
    assert run(q.bfloat16(), k16, v16, tables, lens, spec).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [AttentionSpec(0, 0.25, window=5), AttentionSpec(0, 0.25, softcap=2.0),
                                  AttentionSpec(0, 0.25, window=6, softcap=1.5)], ids=["window", "softcap", "both"])
def test_sliding_window_soft_capping_and_freed_blocks(spec: AttentionSpec) -> None:
    # Blocks given back (negative table entries) lie out of the window: never read, whatever they hold.
    q, k_cache, v_cache, tables, lens = random_case(6, 4, 2, 16, seed=1, freed=spec.window is not None)
    if spec.window:
        lens = [max(length, 3 * BLOCK) for length in lens]
        tables = [t + [t[-1]] * (-(-length // BLOCK) - len(t)) for t, length in zip(tables, lens, strict=True)]
    got = run(q, k_cache, v_cache, tables, lens, spec)
    torch.testing.assert_close(got.double(), reference(q, k_cache, v_cache, tables, lens, spec), rtol=1e-5, atol=1e-5)


def test_a_row_is_the_same_bits_alone_in_any_batch_and_on_any_thread_count() -> None:
    q, k_cache, v_cache, tables, lens = random_case(16, 9, 3, 64, seed=2)
    spec = AttentionSpec(0, 0.125)
    batched = run(q, k_cache, v_cache, tables, lens, spec)
    alone = torch.cat([run(q[i:i + 1], k_cache, v_cache, tables[i:i + 1], lens[i:i + 1], spec) for i in range(16)])
    assert torch.equal(batched, alone)
    reordered = run(q.flip(0), k_cache, v_cache, tables[::-1], lens[::-1], spec)
    assert torch.equal(reordered.flip(0), batched)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run(q, k_cache, v_cache, tables, lens, spec)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, batched)


_AVX2_RUN = """
import sys, torch
from engine import paged_decode
from engine.attention import AttentionSpec
cases = torch.load(sys.argv[1])
torch.save([paged_decode.decode_attention(*tensors, AttentionSpec(0, *spec)) for *tensors, spec in cases], sys.argv[2])
"""


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= cpu_flags(), reason="the CPU cannot run an AVX2 build")
def test_the_avx2_build_gives_this_build_s_bits(tmp_path: Path) -> None:
    # csrc/paged_decode.cpp's loops have an AVX-512 form and an 8-lane form for AVX2-only CPUs (vec.h), which
    # promise the same chains and trees per lane: compared here over full 16-key chunks and tails, grouped and
    # single heads, odd head sizes, a bf16 cache, soft-capping and a window. The AVX2 build runs in a subprocess.
    if "avx512f" not in FLAGS:  # an AVX2-only CPU, or KVSERVE_KERNEL_MARCH=x86-64-v3: one form, nothing to compare
        pytest.skip("this process's build is the AVX2 form already")
    gen = torch.Generator().manual_seed(7)
    cases = []
    for heads, kv_heads, head_dim, spec, dtype in [
        (9, 3, 64, AttentionSpec(0, 0.125), torch.float32), (4, 4, 128, AttentionSpec(0, 0.09), torch.float32),
        (6, 2, 80, AttentionSpec(0, 0.11, softcap=3.0), torch.float32),
        (8, 2, 64, AttentionSpec(0, 0.125, window=37), torch.bfloat16)]:
        blocks = 48
        k_cache = (torch.randn(blocks, BLOCK, kv_heads, head_dim, generator=gen) * 3).to(dtype)
        v_cache = torch.randn(blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
        lens = torch.tensor([1, 15, 16, 17, 33, 64, 90, 150], dtype=torch.int32)
        tables = torch.stack([torch.randperm(blocks, generator=gen)[:40] for _ in lens]).to(torch.int32)
        q = torch.randn(len(lens), heads, head_dim, generator=gen) * 2
        cases.append((q, k_cache, v_cache, tables, lens, spec))
    torch.save([(*tensors, (spec.scale, spec.window, spec.softcap)) for *tensors, spec in cases], tmp_path / "cases.pt")
    env = {**os.environ, "KVSERVE_KERNEL_MARCH": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, "-c", _AVX2_RUN, str(tmp_path / "cases.pt"), str(tmp_path / "avx2.pt")],
                   env=env, check=True, timeout=300)
    for case, avx2 in zip(cases, torch.load(tmp_path / "avx2.pt"), strict=True):
        assert torch.equal(paged_decode.decode_attention(*case), avx2)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5])
def test_rows_of_one_sequence_a_verify_step_s_drafts_are_each_the_same_bits_as_alone(cache_dtype: torch.dtype,
                                                                                   window: int) -> None:
    q, k_cache, v_cache, tables, lens = random_case(6, 9, 3, 64, seed=4)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    # rows 1-4: one sequence's next four positions (the same table), between two other sequences
    tables = [tables[0], *[tables[1]] * 4, tables[2]]
    base = max(1, min(lens[1], len(tables[1]) * BLOCK - 3))
    lens = [lens[0], base, base + 1, base + 2, base + 3, lens[2]]
    spec = AttentionSpec(0, 0.125, window=window or None)
    q = q[:6]
    batched = run(q, k_cache, v_cache, tables, lens, spec)
    alone = torch.cat([run(q[i:i + 1], k_cache, v_cache, tables[i:i + 1], lens[i:i + 1], spec) for i in range(6)])
    assert torch.equal(batched, alone)
    torch.testing.assert_close(batched.double(), reference(q, k_cache.float(), v_cache.float(), tables, lens, spec),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_served_logits_match_the_gather_and_sdpa_path(tiny_llama_dir: str, chunk_size: int, dtype: torch.dtype,
                                                      tolerance: float) -> None:
    # Decode rows (chunk_size 1: every position is a decode step) through both backends of the runner; in
    # bf16 SDPA rounds its sums to bf16 and the kernel does not, hence the wider tolerance.
    ids = torch.randint(3, 90, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = {}
    for backend in ("native", "sdpa"):
        runner = runner_for(tiny_llama_dir, dtype=dtype, attention_backend=backend)
        assert runner.native_decode == (backend == "native")
        logits[backend] = runner.logits_for(ids, chunk_size=chunk_size).float()
    torch.testing.assert_close(logits["native"], logits["sdpa"], rtol=tolerance, atol=tolerance)


def test_engine_greedy_output_is_the_same_alone_and_batched_by_default(tmp_path: Path) -> None:
    llm = LLM(make_tiny_model_dir(tmp_path), device="cpu", dtype="float32", block_size=BLOCK, speculative=None,
              enable_prefix_caching=False)
    assert llm.engine.runner.native_decode
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 14, 22)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    alone = [llm.generate([p], params)[0].outputs[0] for p in prompts]
    batched = [out.outputs[0] for out in llm.generate(prompts, params)]
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert [[lp.logprob for lp in b.logprobs] for b in batched] == [[lp.logprob for lp in a.logprobs] for a in alone]


def test_a_failing_build_names_the_source_and_the_compilers_words(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    compiler = tmp_path / "failing-g++"
    # compiles every source but one, as a broken or too old compiler might; then fails the link too
    compiler.write_text('#!/bin/sh\ncase "$*" in *rotary.cpp*) echo "rotary: bad things" >&2; exit 1;; esac\n'
                        'for a; do [ "$prev" = -o ] && : > "$a"; prev=$a; done\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("KVSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    native.load.cache_clear()
    try:
        reason = native.unavailable_reason()
        assert reason is not None and "building rotary.cpp failed" in reason and "rotary: bad things" in reason
        assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left to load
    finally:
        native.load.cache_clear()


def test_no_compiler_falls_back_to_sdpa_with_a_reason(tiny_llama_dir: str, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KVSERVE_KERNEL_CACHE", str(tmp_path))  # nothing cached: it would have to build
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        reason = native.unavailable_reason()
        assert reason is not None and "compiler" in reason
        with pytest.raises(ValueError, match="attention_backend=native: .*compiler"):
            paged_decode.use_native("native", torch.device("cpu"), torch.float32)
        with caplog.at_level(logging.WARNING, logger="kvserve.engine"):
            runner = runner_for(tiny_llama_dir)
        assert not runner.native_decode
        assert "paged kernel is unavailable" in caplog.text and "compiler" in caplog.text
    finally:
        native.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_puts_each_token_in_its_slot_as_index_copy_does(dtype: torch.dtype) -> None:
    from engine.attention import write_kv

    gen = torch.Generator().manual_seed(3)
    blocks, kv_heads, head_dim, tokens = 6, 3, 16, 5
    # k and v as a layer hands them over: views into one fused projection, rows strided, each row contiguous
    fused = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    k = fused[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, (4 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.tensor([7, 0, 23, 8, 12])
    caches = [torch.randn(blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    expected = [c.clone().view(-1, kv_heads, head_dim).index_copy_(0, slots, new).view(c.shape)
                for c, new in zip(caches, (k, v), strict=True)]
    assert paged_decode.write_kv(*caches, k, v, slots)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected, strict=True))
    # a layout a slot does not hold row by row: the kernel declines, and write_kv copies with PyTorch
    k_heads_strided = torch.randn(kv_heads, tokens, head_dim, generator=gen).to(dtype).transpose(0, 1)
    assert not paged_decode.write_kv(*caches, k_heads_strided, v, slots)
    write_kv(*caches, k_heads_strided, v, slots)
    assert torch.equal(caches[0].view(-1, kv_heads, head_dim)[slots], k_heads_strided)


def test_backend_names_and_what_the_kernel_reads() -> None:
    with pytest.raises(ValueError, match="unknown attention_backend"):
        paged_decode.use_native("flash", torch.device("cpu"), torch.float32)
    assert paged_decode.use_native("sdpa", torch.device("cpu"), torch.float32) == (False, None)
    native, why = paged_decode.use_native("auto", torch.device("cpu"), torch.float16)
    assert not native and "fp32 and bf16" in why
    with pytest.raises(ValueError, match="not torch.float16 on cpu"):
        paged_decode.use_native("native", torch.device("cpu"), torch.float16)
    assert paged_decode.use_native("auto", torch.device("cpu"), torch.bfloat16) == (True, None)
    assert math.isclose(AttentionSpec(0, 0.5).scale, 0.5)


def test_batch_invariant_gives_the_same_bits_cold_chunked_and_from_the_prefix_cache(tmp_path: Path) -> None:
    path = make_tiny_model_dir(tmp_path)
    prompt = torch.randint(3, 300, (30,), generator=torch.Generator().manual_seed(6)).tolist()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)

    def run_once(llm: LLM, prompt_logprobs: int | None = None) -> tuple[list[int], list[float], list | None]:
        out = llm.generate([prompt], dataclasses.replace(params, prompt_logprobs=prompt_logprobs))[0]
        return out.outputs[0].token_ids, [lp.logprob for lp in out.outputs[0].logprobs], out.prompt_logprobs

    options = dict(device="cpu", dtype="float32", block_size=BLOCK, speculative=None, batch_invariant=True)
    cached = LLM(path, **options)
    cold = run_once(cached)
    assert run_once(cached) == cold  # the prompt's full blocks now come from the prefix cache
    assert cached.engine.blocks.prefix_hits >= len(prompt) - BLOCK
    chunked = LLM(path, max_num_seqs=4, max_num_batched_tokens=7, enable_prefix_caching=False, **options)
    whole = LLM(path, enable_prefix_caching=False, **options)
    # the prompt in chunks of 7 tokens: the same tokens and logprobs, and the prompt's logprobs the same bits too
    assert run_once(chunked, prompt_logprobs=0) == run_once(whole, prompt_logprobs=0)
    assert run_once(chunked)[:2] == cold[:2]
    # and the prompt's attention through the kernel is the same attention as SDPA's, within rounding
    plain = LLM(path, **{**options, "batch_invariant": False})
    got, expected = run_once(whole, prompt_logprobs=0)[2][1:], run_once(plain, prompt_logprobs=0)[2][1:]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in got]), torch.tensor([lp.logprob for lp in expected]),
                               rtol=1e-5, atol=1e-5)


def test_cpu_features_command_says_which_decode_attention_runs(capsys: pytest.CaptureFixture) -> None:
    from service.cli import main

    assert main(["cpu-features"]) == 0
    assert "decode attention (--attention-backend auto): kvserve's paged kernel" in capsys.readouterr().out
