"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step is bounded by a token budget (max_num_batched_tokens) and a sequence cap
(max_num_seqs). Running sequences go first, one token each for decodes and a chunk for
unfinished prefills, so prefill never starves decode; waiting sequences are admitted FCFS
while budget and blocks last. When blocks run out, the newest running sequence is preempted:
its blocks are freed and it is recomputed later (its tokens are kept).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed for it this step, starting at seq.num_computed_tokens

    @property
    def completes(self) -> bool:
        """After this step every known token is computed, so the last one's logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq) + len(self.seq.draft_token_ids)

    @property
    def verifies(self) -> bool:
        """A decode with draft tokens: its last token and the drafts, each computed as a decode row."""
        return bool(self.seq.draft_token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, before the forward
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (it already holds blocks)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        for seq in self.running:  # blocks out of every layer's sliding window go back first
            self.blocks.release_out_of_window(seq)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.draft_token_ids:  # a decode with guesses to check: as many as the budget leaves room for
                del seq.draft_token_ids[max(0, budget - 1):]
                if not self.blocks.can_allocate(seq, len(seq) + len(seq.draft_token_ids)):
                    seq.draft_token_ids.clear()  # guesses are never worth a preemption
            num_new = min(len(seq) + len(seq.draft_token_ids) - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            while not self.blocks.can_allocate(seq, target):
                victim = self.running[-1]
                if victim.seq_id in scheduled_ids:  # never preempt what is already in this batch
                    victim = seq
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            else:
                out.block_copies += self.blocks.allocate(seq, target)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                scheduled_ids.add(seq.seq_id)
                budget -= num_new
                i += 1
        if out.num_preempted:
            return out  # memory is tight: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            reserved = seq.params.n if seq.num_output_tokens == 0 else 1  # room for its forks
            if len(self.running) + reserved > self.max_num_seqs and self.running:
                break
            if not seq.block_table:
                seq.num_computed_tokens = self.blocks.match_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
            num_new = min(len(seq) - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            if not self.blocks.can_allocate(seq, target):
                self.blocks.free_sequence(seq)  # give back the prefix blocks it matched; retry next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            out.block_copies += self.blocks.allocate(seq, target)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take seq out of the queues and give its blocks back."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_token_ids.clear()
        self.blocks.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
