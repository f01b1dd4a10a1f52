"""The block pool: the only owner of KV memory. Fixed-size blocks, ref counts, prefix hashing.

A sequence's block table lists the blocks that hold its tokens' K/V in order. Full blocks whose
K/V are computed get a hash chained over the whole prefix, so another sequence with the same
prefix can reuse them (confirmed by comparing token ids, never by hash alone). Freed blocks keep
their hash until they are handed out again, so a finished request's prefix stays reusable.

When every layer of the model attends through a sliding window, blocks whose tokens are out of the
window of every query still to come are given back while the sequence runs (their table entries
become FREED), so a long generation holds a bounded number of blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.sequence import Sequence

FREED = -1  # a block-table entry whose block was given back (out of every layer's window); reads as masked


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and computed
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.sliding_window = sliding_window  # set when every layer slides: old blocks can be given back
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in least-recently-freed order: the oldest cached prefixes are evicted first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # prompt tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens (plus one copy-on-write of a shared last block)."""
        needed = max(0, -(-num_tokens // self.block_size) - len(seq.block_table))
        if self._last_block_shared(seq, num_tokens):
            needed += 1
        return needed

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Grow seq's table to hold num_tokens tokens. Returns (src, dst) block copies to do first."""
        copies = []
        if self._last_block_shared(seq, num_tokens):
            index = seq.num_computed_tokens // self.block_size
            old, new = seq.block_table[index], self._take_free()
            self._release(old)
            seq.block_table[index] = new
            copies.append((old, new))
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_free())
        return copies

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks; returns how many tokens they cover.

        The last token is always left to compute, since its logits are needed to sample.
        """
        if seq.block_table:
            raise RuntimeError("match_prefix on a sequence that already has blocks")
        self.prefix_queries += seq.num_prompt_tokens
        if not self.enable_prefix_caching or seq.needs_every_position:
            return 0  # e.g. prompt logprobs need every prompt position's logits, so compute them all
        prev_hash = None
        for i in range((len(seq) - 1) // self.block_size):
            ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = hash((prev_hash, ids))
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != ids:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            prev_hash = h
        hit_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += min(hit_tokens, seq.num_prompt_tokens)
        return hit_tokens

    def release_out_of_window(self, seq: Sequence) -> None:
        """Give back the leading blocks no query from num_computed_tokens on can see (all layers slide).

        A query at position p sees keys p - window < k <= p, so keys below num_computed_tokens - window + 1
        are never read again. The blocks keep their prefix hash, so the prompt stays reusable.
        """
        if self.sliding_window is None:
            return
        first_visible = seq.num_computed_tokens - self.sliding_window + 1
        dead = min(max(0, first_visible // self.block_size), len(seq.block_table))
        while seq.num_window_freed < dead:
            index = seq.num_window_freed
            seq.window_freed_hash = self.blocks[seq.block_table[index]].hash  # hashed by commit when it filled
            self._release(seq.block_table[index])
            seq.block_table[index] = FREED
            seq.num_window_freed += 1

    def commit(self, seq: Sequence) -> None:
        """Hash the full blocks whose K/V are now computed, making them reusable prefixes."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        prev_hash = seq.window_freed_hash  # blocks given back were hashed before they went
        for i in range(seq.num_window_freed, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                block.hash, block.token_ids = hash((prev_hash, ids)), ids
                self.cached.setdefault(block.hash, block.block_id)
            prev_hash = block.hash

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (n > 1 samples of one prompt)."""
        for block_id in parent.block_table:
            if block_id != FREED:
                self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.num_window_freed, child.window_freed_hash = parent.num_window_freed, parent.window_freed_hash

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            if block_id != FREED:
                self._release(block_id)
        seq.block_table = []
        seq.num_window_freed, seq.window_freed_hash = 0, None

    def _last_block_shared(self, seq: Sequence, num_tokens: int) -> bool:
        """Writing past num_computed_tokens lands in a partly-filled block another sequence also holds."""
        if not seq.block_table or seq.num_computed_tokens % self.block_size == 0:
            return False
        if seq.num_computed_tokens >= num_tokens:
            return False
        last = seq.block_table[seq.num_computed_tokens // self.block_size]
        return self.blocks[last].ref_count > 1

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None:
                self.free[block_id] = None
                self.free.move_to_end(block_id, last=False)  # holds nothing reusable: hand it out first
            else:
                self.free[block_id] = None
