"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from engine import paged_decode
from engine.attention import (
    AttentionMetadata,
    DecodeGroup,
    DecodeTables,
    PrefillSpan,
    build_prefill_mask,
    grouped_mask,
)
from engine.config import ModelConfig
from engine.decode_graph import Arena, DecodeGraph, StepInputs
from engine.kv_cache import BlockManager
from engine.resident_memory import lazy_zeros, make_resident
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.sequence import Sequence

log = logging.getLogger("kvserve.engine")


def kv_bytes_per_block(cfg: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    """K and V, every layer, one block."""
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass(slots=True)
class StepLogits:
    """Logits of one scheduled sequence: the last row samples; all rows when prompt logprobs are wanted."""

    seq: Sequence
    logits: torch.Tensor  # (rows, vocab) float32
    first_position: int  # position of the token whose logits are row 0


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed memory for the KV cache; on CPU not yet resident (engine/resident_memory.py: make_kv_cache_resident).

    It must be zeros, not empty: padded key slots are masked, but 0 * NaN from garbage would be NaN.
    """
    return lazy_zeros(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)


@dataclass(slots=True)
class _DecodeRow:
    """One query row attending as a decode: the token at `position` of a decoding or verifying sequence."""

    item: ScheduledSeq
    position: int
    block_size: int

    @property
    def token_id(self) -> int:
        seq = self.item.seq
        return seq.token_ids[self.position] if self.position < len(seq) else seq.draft_token_ids[self.position - len(seq)]

    @property
    def num_blocks(self) -> int:
        """Blocks holding keys 0..position: what a plain decode at this position has in its block table."""
        return -(-(self.position + 1) // self.block_size)


def wants_prompt_logits(seq: Sequence) -> bool:
    return seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0


class ModelRunner:
    def __init__(self, model: nn.Module, cfg: ModelConfig, device: str, dtype: torch.dtype,
                 block_size: int, num_blocks: int, batch_invariant: bool = False,
                 attention_backend: str = "auto") -> None:
        self.model, self.cfg = model, cfg
        self.device = torch.device(device)
        # Decode attention: kvserve's paged kernel (engine/paged_decode.py) wherever it runs, else gather + SDPA.
        self.native_decode, why_not = paged_decode.use_native(attention_backend, self.device, dtype)
        if why_not and self.device.type == "cpu":
            log.warning(f"decode attention gathers KV blocks for PyTorch's SDPA (slower; a row's result may depend "
                        f"on its batch unless --batch-invariant): kvserve's paged kernel is unavailable: {why_not}")
        self.batch_invariant = batch_invariant and self.device.type == "cpu"
        self.block_size = block_size
        self.group = cfg.num_heads // cfg.num_kv_heads  # query heads per KV head
        # Sliding-window layers get masks of their own, built once per step beside the causal ones.
        self.window = cfg.sliding_window if any(cfg.is_sliding(i) for i in range(cfg.num_layers)) else None
        # One tensor for the whole cache, allocated once; each layer's attention holds views into it.
        self.kv_cache = _zeros((2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
                               dtype, self.device)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
        # Decode steps replay the kernel calls recorded at the first step of their size (engine/decode_graph.py), by
        # rows; None where that step ran PyTorch ops too (the modules run then). Their outputs share one arena.
        self.records_decode_steps = (self.device.type == "cpu" and self.native_decode and dtype == torch.float32
                                     and hasattr(model, "run_layers"))
        self.decode_graphs: dict[int, DecodeGraph | None] = {}
        self.graph_arena = Arena()
        self.graph_inputs: StepInputs | None = None

    def make_kv_cache_resident(self) -> threading.Thread | None:
        """Have every page of a CPU KV cache backed, on a background thread (engine/resident_memory.py)."""
        return make_resident(self.kv_cache) if self.kv_cache.device.type == "cpu" else None

    @classmethod
    def for_testing(cls, model: nn.Module, cfg: ModelConfig, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, block_size: int = 16, num_blocks: int = 64,
                    attention_backend: str = "auto") -> ModelRunner:
        return cls(model, cfg, device, dtype, block_size, num_blocks, attention_backend=attention_backend)

    @torch.inference_mode()
    def logits_for(self, token_ids: list[int], chunk_size: int | None = None) -> torch.Tensor:
        """Logits at every position of one sequence, computed in chunks through the cache (for tests)."""
        blocks = BlockManager(self.kv_cache.shape[2], self.block_size, enable_prefix_caching=False)
        seq = Sequence(0, "test", list(token_ids), SamplingParams(prompt_logprobs=0))
        chunk_size = chunk_size or len(token_ids)
        rows = []
        while seq.num_computed_tokens < len(seq):
            num_new = min(chunk_size, len(seq) - seq.num_computed_tokens)
            blocks.allocate(seq, seq.num_computed_tokens + num_new)
            (result,) = self.execute(SchedulerOutput([ScheduledSeq(seq, num_new)]))
            rows.append(result.logits)
            seq.num_computed_tokens += num_new
        return torch.cat(rows)

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> list[StepLogits]:
        """One forward pass over the batch; logits for sequences that complete or want prompt logprobs."""
        for src, dst in batch.block_copies:
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        # Prefill chunks first, then single-token decode rows, which share one batched attention call. A
        # verifying sequence (draft tokens to check) gives one decode row per token, each laid out exactly as
        # a plain decode at that position would be, so its logits are the same (engine/speculative.py).
        prefills = [s for s in batch.scheduled if s.num_new_tokens > 1 and not s.verifies]
        decode_rows = [_DecodeRow(item, item.seq.num_computed_tokens + j, self.block_size)
                       for item in batch.scheduled if item.num_new_tokens == 1 or item.verifies
                       for j in range(item.num_new_tokens)]
        # Sorted by block-table length, so each length's rows are contiguous (see DecodeGroup); stable, so a
        # verifying sequence's rows stay in position order.
        decode_rows.sort(key=lambda row: row.num_blocks)
        ids, positions, slots = [], [], []
        rows_of: dict[int, list[int]] = {}  # seq_id -> its rows of the hidden states, in position order
        for item in prefills:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            rows_of[seq.seq_id] = list(range(len(ids), len(ids) + item.num_new_tokens))
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, p) for p in range(start, end)]
        for row in decode_rows:
            seq = row.item.seq
            rows_of.setdefault(seq.seq_id, []).append(len(ids))
            ids.append(row.token_id)
            positions.append(row.position)
            slots.append(self._slot(seq, row.position))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self._recordable(batch, prefills, decode_rows):  # a small decode step (engine/decode_graph.py)
            hidden = None
            replayed = self._recorded_step(self.model.embed(input_ids, pos), positions, slots,
                                           [row.item.seq.block_table[:row.num_blocks] for row in decode_rows])
        else:
            hidden = self.model(input_ids, pos, self._metadata(prefills, decode_rows, slots))

        wanted, pooled = [], []
        for item in batch.scheduled:
            seq, rows = item.seq, rows_of[item.seq.seq_id]
            if seq.pooler is not None:
                pooled.append((item, rows))
            elif wants_prompt_logits(seq) or item.verifies:
                wanted.append((item, rows))
            elif item.completes:
                wanted.append((item, rows[-1:]))
        if pooled:
            self._pool(hidden, pooled)
        if not wanted:
            return []
        picked = torch.tensor([r for _, rows in wanted for r in rows], device=self.device)
        logits = replayed[picked] if hidden is None else self.model.compute_logits(hidden[picked])
        out, offset = [], 0
        for item, rows in wanted:
            n = len(rows)
            first = item.seq.num_computed_tokens + item.num_new_tokens - n
            out.append(StepLogits(item.seq, logits[offset:offset + n], first))
            offset += n
        return out

    def _recordable(self, batch: SchedulerOutput, prefills: list[ScheduledSeq], decode_rows: list[_DecodeRow]) -> bool:
        """Decode rows only (plain or verifying), each wanting logits and nothing else (no pooling, no prompt
        logprobs), where a step of that size has not been found to run PyTorch ops."""
        return (self.records_decode_steps and not prefills and len(decode_rows) > 0
                and self.decode_graphs.get(len(decode_rows), True) is not None
                and all(item.completes and item.seq.pooler is None and not wants_prompt_logits(item.seq)
                        for item in batch.scheduled))

    def _recorded_step(self, hidden: torch.Tensor, positions: list[int], slots: list[int],
                       block_tables: list[list[int]]) -> torch.Tensor:
        """Logits of the decode rows: the step's recorded kernel calls replayed, or recorded now (first of its size)."""
        rows = len(positions)
        if (graph := self.decode_graphs.get(rows)) is not None:
            return graph.replay(hidden, positions, slots, block_tables)
        if self.graph_inputs is None or rows > self.graph_inputs.capacity:  # every graph reads them: record anew
            # No table is longer than the model's context or the pool.
            max_blocks = min(self.kv_cache.shape[2], -(-self.cfg.max_position_embeddings // self.block_size))
            # 8 to start with: batch 1's speculative verify steps and small batches
            capacity = max(rows, 2 * self.graph_inputs.capacity if self.graph_inputs else 8)
            self.graph_inputs = StepInputs(capacity, hidden.shape[1], max_blocks)
            self.decode_graphs.clear()
        graph, logits, why_not = DecodeGraph.capture(self.model, self.graph_inputs, self.graph_arena, hidden,
                                                     positions, slots, block_tables)
        if self.graph_arena.outgrown:  # twice what this step wanted, and every size recorded again into it
            self.graph_arena = Arena(2 * self.graph_arena.wanted)
            self.decode_graphs.clear()
            return logits
        self.decode_graphs[rows] = graph
        if why_not:
            log.info(f"decode steps of {rows} row(s) run the modules (not recorded): {why_not}")
        return logits

    def _pool(self, hidden: torch.Tensor, pooled: list[tuple[ScheduledSeq, list[int]]]) -> None:
        """Hand embedding sequences their rows' final hidden states (after the final norm, no LM head)."""
        states = self.model.final_norm(hidden[torch.tensor([r for _, rows in pooled for r in rows],
                                                            device=self.device)])
        offset = 0
        for item, rows in pooled:
            n = len(rows)
            item.seq.pooler.add(states[offset:offset + n], item.seq.num_computed_tokens)
            offset += n

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _context_slot(self, seq: Sequence, position: int) -> int:
        """Where a key is read from; a block given back (FREED, out of every window) reads block 0, masked."""
        return max(seq.block_table[position // self.block_size], 0) * self.block_size + position % self.block_size

    def _metadata(self, prefills: list[ScheduledSeq], decode_rows: list[_DecodeRow], slots: list[int]) -> AttentionMetadata:
        device = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
                                 single_thread_decode=self.batch_invariant and not self.native_decode)
        if self.native_decode and self.batch_invariant:
            # Prompt tokens too, each a row of the kernel seeing keys 0..its position: then a token's attention
            # is the same however its prompt was chunked, found in the prefix cache or recomputed after preemption.
            prompt_rows = [_DecodeRow(item, position, self.block_size) for item in prefills
                           for position in range(item.seq.num_computed_tokens,
                                                 item.seq.num_computed_tokens + item.num_new_tokens)]
            if prompt_rows or decode_rows:
                meta.decode_tables = self._decode_tables(prompt_rows + decode_rows)
            return meta
        start = 0
        for item in prefills:
            seq, n = item.seq, item.num_new_tokens
            context_len = seq.num_computed_tokens + n
            span = PrefillSpan(start, n, context_len, None)
            if seq.num_computed_tokens > 0:
                span.context_slots = torch.tensor([self._context_slot(seq, p) for p in range(context_len)],
                                                  dtype=torch.long, device=device)
                span.mask = grouped_mask(build_prefill_mask(n, context_len, device), self.group)
            if self.window is not None and context_len > self.window:  # some key is out of some query's window
                span.window_mask = grouped_mask(build_prefill_mask(n, context_len, device, self.window), self.group)
            meta.prefills.append(span)
            start += n
        meta.num_prefill_tokens = start
        if self.native_decode:
            if decode_rows:
                meta.decode_tables = self._decode_tables(decode_rows)
            return meta
        start = 0
        for num_blocks, same_length in itertools.groupby(decode_rows, key=lambda row: row.num_blocks):
            members = list(same_length)
            block_ids = torch.tensor([max(b, 0) for row in members for b in row.item.seq.block_table[:num_blocks]],
                                     dtype=torch.long, device=device)  # FREED -> 0, masked
            context_lens = torch.tensor([row.position + 1 for row in members], device=device)
            key_pos = torch.arange(num_blocks * self.block_size, device=device).unsqueeze(0)
            valid = key_pos < context_lens.unsqueeze(1)
            mask = grouped_mask(valid.unsqueeze(1), self.group)
            group = DecodeGroup(start, len(members), block_ids, mask)
            if self.window is not None and max(row.position + 1 for row in members) > self.window:
                in_window = valid & (key_pos >= context_lens.unsqueeze(1) - self.window)
                group.window_mask = grouped_mask(in_window.unsqueeze(1), self.group)
            meta.decode_groups.append(group)
            start += len(members)
        return meta

    def _decode_tables(self, decode_rows: list[_DecodeRow]) -> DecodeTables:
        """Each row's block table (FREED entries stay negative: the kernel skips them) and length."""
        width = max(row.num_blocks for row in decode_rows)
        tables = [row.item.seq.block_table[:row.num_blocks] + [0] * (width - row.num_blocks) for row in decode_rows]
        return DecodeTables(torch.tensor(tables, dtype=torch.int32),
                            torch.tensor([row.position + 1 for row in decode_rows], dtype=torch.int32))
