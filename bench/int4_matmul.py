"""Microbenchmark: PyTorch's packed int4 weight-only CPU matmul against kvserve's current kernels.

On SmolLM2-135M's matmul shapes, at batch 1 and 16, times in one process, interleaved (every repetition
runs every kernel once, in a shuffled order) so that a loaded machine slows all kernels alike; reports
medians. Kernels:

- fp16: fbgemm's fp16 GEMM (kvserve's default on x86 without AMX, engine/models/cpu_matmul.py)
- int8: fbgemm's int8 GEMM (kvserve's `--quantization int8`)
- int4-bf16: `aten._weight_int4pack_mm_for_cpu` over weights packed by
  `aten._convert_weight_to_int4pack_for_cpu` (groups of 32, a scale and a zero point per group: Q4_1's
  layout), with activations, scales and output in bf16 (the fp32 model casts in and out)
- int4-kvserve: kvserve's bf16 int4 kernel (csrc/int4_gemv.cpp, what the engine runs where PyTorch packs for
  AVX-512 and the CPU lacks VNNI) on the same packed weights, fp32 in and out; it must give int4-bf16's
  bits, which is checked
- int4-integer: kvserve's integer kernel (csrc/w4a16_matmul.cpp, the engine's where the CPU has AVX-512
  VNNI): rows quantized to 16 bits per group of 32, int32 sums (AMX tiles from 8 rows where present)
- int4-integer-avx2: the same kernel's AVX2 build (csrc/integer_avx2.cpp, the engine's where the CPU has AVX2
  but not VNNI), where the CPU has VNNI too: both builds' speed on one CPU; it must give int4-integer's bits,
  which is checked
- int4-fp32 / int4-fp16 (`--all-int4`): the same op with fp32 or fp16 activations, which takes a scalar
  fallback: 25-300x slower than fp16 on these shapes, so left out by default

Also reports, per int4 kernel, its error against the fp32 product of the same 4-bit weights and whether
each row of a batch of 16 equals that row computed alone (batch invariance).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.common import fmt, machine_info, markdown_table, write_report

# (name, out_features, in_features) of SmolLM2-135M: hidden 576, 9 + 2*3 heads of 64, MLP 1536, vocab 49152.
SHAPES = [("o_proj", 576, 576), ("qkv_proj", 960, 576), ("gate_up_proj", 3072, 576),
          ("down_proj", 576, 1536), ("lm_head", 49152, 576)]
GROUP = 32
_SAME_BITS_AS = {"int4-kvserve": "int4-bf16", "int4-integer-avx2": "int4-integer"}  # checked, batch 16
_INT4_OURS = ("int4-kvserve", "int4-integer", "int4-integer-avx2")  # kvserve's int4 kernels, each against int4-bf16


def q4_1_weight(out_features: int, in_features: int, gen: torch.Generator):
    """Random Q4_1-style weight: 4-bit codes q, per-group scale d and minimum m (fp16 values, as in GGUF)."""
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=gen)
    groups = in_features // GROUP
    d = (torch.rand(out_features, groups, generator=gen) * 0.01 + 1e-4).half().float()
    m = (-8 * d + torch.randn(out_features, groups, generator=gen) * 1e-3).half().float()
    dense = codes.float() * d.repeat_interleave(GROUP, 1) + m.repeat_interleave(GROUP, 1)
    return codes, d, m, dense


def int4_kernel(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, dtype: torch.dtype):
    """x -> x @ W.T with W = q * d + m, via the aten int4 kernel in `dtype`.

    The kernel computes (q - 8) * scale + zero, so zero = m + 8 d; scales and zeros are (groups, out, 2).
    """
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scales_zeros = torch.stack([d.T, (m + 8 * d).T], dim=-1).to(dtype).contiguous()

    def linear(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, GROUP, scales_zeros).float()

    return linear


def kernels_for(codes, d, m, dense, all_int4: bool = False) -> dict:
    from engine.models.cpu_matmul import _fp16_kernel, _int8_kernel
    from engine.models.int4_matmul import FourBitGroups, _native_linear, _pack, native_kernel_reason
    from engine.models.w4a16_matmul import w4a16_kind, w4a16_linear

    kernels = {"fp16": _fp16_kernel(dense, None), "int8": _int8_kernel(dense, None),
               "int4-bf16": int4_kernel(codes, d, m, torch.bfloat16)}
    groups = FourBitGroups(codes, d, m)
    if native_kernel_reason() is None:
        kernels["int4-kvserve"] = _native_linear(*_pack(groups), None, *codes.shape)
    if kind := w4a16_kind():
        kernels["int4-integer"] = w4a16_linear(groups, None)
        if kind != "AVX2" and (avx2 := w4a16_linear(groups, None, isa="avx2")) is not None:
            kernels["int4-integer-avx2"] = avx2  # the build AVX2-only CPUs run, on this CPU: the same bits
    if all_int4:
        kernels |= {"int4-fp32": int4_kernel(codes, d, m, torch.float32),
                    "int4-fp16": int4_kernel(codes, d, m, torch.float16)}
    return kernels


def time_interleaved(kernels: dict, x: torch.Tensor, reps: int, calls: int, seed: int = 0) -> dict[str, float]:
    """Median microseconds per call of each kernel; each repetition times every kernel once, shuffled."""
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    order = list(kernels)
    rng = random.Random(seed)
    for fn in kernels.values():
        fn(x)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            fn = kernels[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def batch_invariant(fn, x: torch.Tensor) -> bool:
    """Every row of the batch equals the same row computed alone, bit for bit."""
    alone = torch.cat([fn(row) for row in x.split(1)])
    return torch.equal(fn(x), alone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int4_matmul", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--reps", type=int, default=41, help="interleaved repetitions (median reported)")
    parser.add_argument("--calls", type=int, default=5, help="calls per timed sample")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared machine, OpenMP threads waiting for a "
                             "busy core turn microseconds into milliseconds)")
    parser.add_argument("--all-int4", action="store_true", help="also the slow fp32/fp16-input int4 variants")
    parser.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES), help="which matmuls")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows, exactness, data = [], [], {}
    wanted = args.shapes.split(",")
    for name, out_features, in_features in (s for s in SHAPES if s[0] in wanted):
        codes, d, m, dense = q4_1_weight(out_features, in_features, gen)
        kernels = kernels_for(codes, d, m, dense, args.all_int4)
        x16 = torch.randn(16, in_features, generator=gen)
        reference = x16 @ dense.T
        scale = reference.abs().max().item()
        for kernel in kernels:
            err = (kernels[kernel](x16) - reference).abs().max().item() / scale
            twin = _SAME_BITS_AS.get(kernel)
            same = "" if twin is None else (
                f"{twin}: " + ("yes" if torch.equal(kernels[kernel](x16), kernels[twin](x16)) else "NO"))
            exactness.append([name, kernel, f"{err:.1e}", "yes" if batch_invariant(kernels[kernel], x16) else "NO",
                              same])
        for batch in batch_sizes:
            x = torch.randn(batch, in_features, generator=gen)
            times = time_interleaved(kernels, x, args.reps, args.calls)
            data[f"{name}/{batch}"] = times
            ratios = [fmt(times["fp16"] / times["int4-bf16"], 2) + "x"]
            ratios += [fmt(times["int4-bf16"] / times[k], 2) + "x" for k in _INT4_OURS if k in times]
            rows.append([f"{name} {out_features}x{in_features}", batch, *(fmt(times[k]) for k in kernels), *ratios])
            print(rows[-1], flush=True)
    headers = ["matmul", "batch", *(f"{k} µs" for k in kernels), "fp16/int4-bf16"]
    headers += [f"int4-bf16/{k}" for k in _INT4_OURS if k in kernels]
    info = machine_info()
    text = (f"Median µs per call, {args.threads} thread(s), {args.reps}x{args.calls} interleaved calls, "
            f"load average {info.get('loadavg_1m')}\n\n" + markdown_table(headers, rows)
            + "\n\nMax error vs the fp32 product of the same 4-bit weights (relative to max |y|), batch 16, "
              "and batch invariance (rows of 16 == rows alone)\n\n"
            + markdown_table(["matmul", "kernel", "max rel error", "batch invariant", "the same bits as"], exactness))
    write_report(args.output, {"machine": info, "threads": args.threads, "reps": args.reps, "calls": args.calls, "times_us": data,
                               "exactness": exactness}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
