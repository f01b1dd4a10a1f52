"""One request's state as the engine sees it: ids, blocks, progress, timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.pooling import Pooler
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One stream of tokens. A request with n > 1 has n sequences sharing its prompt blocks."""

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    index: int = 0  # which of the request's n samples this is
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt followed by output
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_window_freed: int = 0  # leading block-table entries given back: out of every layer's sliding window
    window_freed_hash: int | None = None  # prefix hash of the last of those, to chain later blocks' hashes on
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    pooler: Pooler | None = None  # set for embedding requests: prefill only, final states pooled
    # Guessed next tokens checked by this step's forward pass (engine/speculative.py); empty otherwise.
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_steps: int = 0  # steps that checked drafts of this sequence
    num_drafts_kept: int = 0  # drafts the model agreed with, over those steps

    @property
    def needs_every_position(self) -> bool:
        """Prompt logprobs and mean/CLS pooling read every prompt position: no prefix-cache hit may skip one."""
        return self.params.prompt_logprobs is not None or (self.pooler is not None and self.pooler.needs_every_position)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while some known token (prompt, or output after a preemption) has no K/V yet beyond the last."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    def __len__(self) -> int:
        return len(self.token_ids)
