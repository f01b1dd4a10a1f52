"""Microbenchmark: one layer's attention call, kvserve's paged kernel against the gather + SDPA path.

SmolLM2-135M's attention shape (9 query heads, 3 KV heads of 64), 16-token blocks scattered over a
2048-block pool as a served cache's are. Decode: a batch of rows with context lengths drawn from a range;
`--attention-backend native` (engine/paged_decode.py) against `sdpa` (engine/attention.py: index_select the
blocks of each block-table length, then PyTorch's SDPA). Prefill (`--prefill`): one prompt's rows at once,
the kernel row by row (what `--batch-invariant` runs) against SDPA's causal flash attention. Reports
median µs per call and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import machine_info, markdown_table, parse_int_list, write_report
from engine import paged_decode
from engine.attention import (
    AttentionMetadata,
    AttentionSpec,
    DecodeGroup,
    _decode_attention,
    _grouped_sdpa,
    grouped_mask,
)

BLOCK, KV_HEADS, HEAD_DIM, HEADS, POOL = 16, 3, 64, 9, 2048
SPEC = AttentionSpec(0, HEAD_DIM ** -0.5)


def median_us(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def decode_case(batch: int, lo: int, hi: int, rng: random.Random):
    k_cache, v_cache = torch.randn(POOL, BLOCK, KV_HEADS, HEAD_DIM), torch.randn(POOL, BLOCK, KV_HEADS, HEAD_DIM)
    lens = sorted(rng.randint(lo, hi) for _ in range(batch))
    order = rng.sample(range(POOL), POOL)
    tables, taken = [], 0
    for length in lens:
        count = -(-length // BLOCK)
        tables.append(order[taken:taken + count])
        taken += count
    q = torch.randn(batch, HEADS, HEAD_DIM)
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    meta, start = AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long)), 0
    for count, rows in itertools.groupby(range(batch), key=lambda r: len(tables[r])):  # as the runner groups them
        rows = list(rows)
        valid = torch.arange(count * BLOCK).unsqueeze(0) < lens_t[rows].unsqueeze(1)
        meta.decode_groups.append(DecodeGroup(start, len(rows), torch.tensor([b for r in rows for b in tables[r]]),
                                              grouped_mask(valid.unsqueeze(1), HEADS // KV_HEADS)))
        start += len(rows)
    native = lambda: paged_decode.decode_attention(q, k_cache, v_cache, padded, lens_t, SPEC)  # noqa: E731
    sdpa = lambda: _decode_attention(q, k_cache, v_cache, meta, SPEC)  # noqa: E731
    return native, sdpa


def prefill_case(length: int):
    blocks = -(-length // BLOCK)
    k_cache, v_cache = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM), torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM)
    tables = torch.arange(blocks, dtype=torch.int32).expand(length, blocks).contiguous()
    lens = torch.arange(1, length + 1, dtype=torch.int32)
    q = torch.randn(length, HEADS, HEAD_DIM)
    k, v = (c.view(-1, KV_HEADS, HEAD_DIM)[:length].transpose(0, 1).unsqueeze(0) for c in (k_cache, v_cache))
    native = lambda: paged_decode.decode_attention(q, k_cache, v_cache, tables, lens, SPEC)  # noqa: E731
    sdpa = lambda: _grouped_sdpa(q.transpose(0, 1).unsqueeze(0), k, v, None, True, SPEC)[0].transpose(0, 1)  # noqa: E731
    return native, sdpa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=parse_int_list, default=[1, 16, 64])
    parser.add_argument("--contexts", default="50-60,170-190", help="context length ranges of the decode rows")
    parser.add_argument("--prefill", type=parse_int_list, default=[45, 256, 1024], help="prompt lengths")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--output", default=None, help="write results JSON here (and .md beside it)")
    args = parser.parse_args()
    if reason := paged_decode.unavailable_reason():
        raise SystemExit(f"the kernel is unavailable here: {reason}")
    rng = random.Random(0)
    torch.manual_seed(0)
    rows, results = [], []
    for span in args.contexts.split(","):
        lo, hi = map(int, span.split("-"))
        for batch in args.batch_sizes:
            native, sdpa = decode_case(batch, lo, hi, rng)
            cells = [median_us(native, args.reps), median_us(sdpa, args.reps)]
            diff = (native() - sdpa()).abs().max().item()
            rows.append([f"decode, {lo}-{hi} keys", batch, f"{cells[0]:.0f}", f"{cells[1]:.0f}",
                         f"{cells[1] / cells[0]:.2f}x", f"{diff:.1e}"])
            results.append({"case": "decode", "keys": span, "rows": batch, "native_us": cells[0], "sdpa_us": cells[1]})
    for length in args.prefill:
        native, sdpa = prefill_case(length)
        reps = max(3, args.reps * 64 // length)
        cells = [median_us(native, reps), median_us(sdpa, reps)]
        diff = (native() - sdpa()).abs().max().item()
        rows.append([f"prefill, {length}-token prompt", length, f"{cells[0]:.0f}", f"{cells[1]:.0f}",
                     f"{cells[1] / cells[0]:.2f}x", f"{diff:.1e}"])
        results.append({"case": "prefill", "rows": length, "native_us": cells[0], "sdpa_us": cells[1]})
    table = markdown_table(["call", "rows", "kernel µs", "gather + SDPA µs", "kernel speed-up", "max abs diff"], rows)
    write_report(args.output, {"machine": machine_info(), "threads": torch.get_num_threads(), "results": results},
                 f"One layer's attention, {HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM}, "
                 f"{torch.get_num_threads()} threads, median of {args.reps} calls:\n\n{table}")


if __name__ == "__main__":
    main()
