"""Per-choice builders: turn engine deltas into OpenAI choice objects, both as stream chunks and
as the final non-streamed choice (one code path, so streamed text equals non-streamed text)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engine.outputs import CompletionOutput, TokenLogprob
from service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatDelta,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
)


def public_finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop and length; an aborted choice reports none (the route sends an error)."""
    return reason if reason in ("stop", "length") else None


class CompletionChoiceBuilder:
    """One /v1/completions choice; `echo` puts the prompt (and its logprobs) in front."""

    def __init__(self, index: int, tokenizer: Any, logprobs: int | None, echo_text: str | None = None,
                 echo_token_ids: list[int] | None = None, prompt_only: bool = False) -> None:
        self.index = index
        self.prompt_only = prompt_only  # max_tokens 0: drop the one token the engine had to sample
        self.tokenizer = tokenizer
        self.want_logprobs = logprobs is not None
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs = CompletionLogprobs()
        self.finish_reason: str | None = None
        self._echo_text = echo_text
        self._echo_ids = echo_token_ids
        self._sent_anything = False
        self._prompt_logprobs_done = False

    def _add_logprobs(self, target: CompletionLogprobs, ids: list[int], entries: list[TokenLogprob | None],
                      start_offset: int) -> None:
        offset = start_offset
        for token_id, entry in zip(ids, entries, strict=False):
            token = self.tokenizer.token_text(token_id)
            target.tokens.append(token)
            target.text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token: nothing predicts it
                target.token_logprobs.append(None)
                target.top_logprobs.append(None)
                continue
            target.token_logprobs.append(entry.logprob)
            top = {self.tokenizer.token_text(tid): lp for tid, lp in entry.top}
            top.setdefault(token, entry.logprob)
            target.top_logprobs.append(top)

    def delta(self, out: CompletionOutput, prompt_logprobs: list[TokenLogprob | None] | None = None
              ) -> CompletionChoice | None:
        """Absorb one engine delta; the stream chunk choice for it, or None if nothing is new."""
        if self.prompt_only:
            out = replace(out, delta_text="", delta_token_ids=[], delta_logprobs=None,
                          finish_reason="length" if out.finish_reason == "stop" else out.finish_reason)
        first = not self._sent_anything
        prefix = self._echo_text if first and self._echo_text is not None else ""
        chunk_logprobs = CompletionLogprobs() if self.want_logprobs else None
        if chunk_logprobs is not None:
            if first and self._echo_ids:
                entries = list(prompt_logprobs or [None] * len(self._echo_ids))
                self._prompt_logprobs_done = prompt_logprobs is not None
                self._add_logprobs(chunk_logprobs, self._echo_ids, entries, len(self.text))
            if out.delta_token_ids:
                entries = list(out.delta_logprobs or [None] * len(out.delta_token_ids))
                self._add_logprobs(chunk_logprobs, out.delta_token_ids, entries, len(self.text) + len(prefix))
        if not first and prompt_logprobs is not None:
            self._patch_prompt_logprobs(prompt_logprobs)
        text = prefix + out.delta_text
        self.token_ids += out.delta_token_ids
        finish = None
        if out.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = finish = out.finish_reason
        if not text and not out.delta_token_ids and finish is None:
            return None
        self._sent_anything = True
        self.text += text
        if chunk_logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(chunk_logprobs, name))
        return CompletionChoice(index=self.index, text=text, logprobs=chunk_logprobs,
                                finish_reason=public_finish_reason(finish))

    def _patch_prompt_logprobs(self, entries: list[TokenLogprob | None]) -> None:
        """The engine sends prompt logprobs with the last output: fill the echoed prompt's entries."""
        if self._prompt_logprobs_done or not self.want_logprobs or not self._echo_ids:
            return
        self._prompt_logprobs_done = True
        patch = CompletionLogprobs()
        self._add_logprobs(patch, self._echo_ids, list(entries), 0)
        count = len(self._echo_ids)
        self.logprobs.token_logprobs[:count] = patch.token_logprobs
        self.logprobs.top_logprobs[:count] = patch.top_logprobs

    def final(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.text,
                                logprobs=self.logprobs if self.want_logprobs else None,
                                finish_reason=public_finish_reason(self.finish_reason))


class ChatChoiceBuilder:
    """One /v1/chat/completions choice; its first chunk carries the role."""

    def __init__(self, index: int, tokenizer: Any, logprobs: bool) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.want_logprobs = logprobs
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[ChatTokenLogprob] = []
        self.finish_reason: str | None = None
        self._sent_role = False

    def _entry(self, token_id: int, entry: TokenLogprob | None) -> ChatTokenLogprob:
        token = self.tokenizer.token_text(token_id)
        if entry is None:
            return ChatTokenLogprob(token=token, logprob=0.0, bytes=list(token.encode()))
        top = [ChatTopLogprob(token=(t := self.tokenizer.token_text(tid)), logprob=lp, bytes=list(t.encode()))
               for tid, lp in entry.top]
        return ChatTokenLogprob(token=token, logprob=entry.logprob, bytes=list(token.encode()), top_logprobs=top)

    def role_chunk(self) -> ChatStreamChoice:
        """The first chunk of a stream: role and empty content."""
        self._sent_role = True
        return ChatStreamChoice(index=self.index, delta=ChatDelta(role="assistant", content=""))

    def delta(self, out: CompletionOutput) -> ChatStreamChoice | None:
        """Absorb one engine delta; the stream chunk choice for it, or None if nothing is new."""
        new_logprobs = None
        if self.want_logprobs and out.delta_token_ids:
            entries = list(out.delta_logprobs or [None] * len(out.delta_token_ids))
            new_logprobs = [self._entry(t, e) for t, e in zip(out.delta_token_ids, entries, strict=False)]
            self.logprobs += new_logprobs
        self.token_ids += out.delta_token_ids
        self.text += out.delta_text
        finish = None
        if out.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = finish = out.finish_reason
        message_delta = self._message_delta(out.delta_text, finished=finish is not None)
        if message_delta is None and not new_logprobs and finish is None:
            return None
        return ChatStreamChoice(
            index=self.index,
            delta=message_delta or ChatDelta(),
            logprobs=ChatChoiceLogprobs(content=new_logprobs) if new_logprobs is not None else None,
            finish_reason=self.public_finish_reason(finish),
        )

    def _message_delta(self, text: str, finished: bool) -> ChatDelta | None:
        """What the client sees of new model text (a subclass parses tool calls out of it)."""
        return ChatDelta(content=text) if text else None

    def _message(self) -> AssistantMessage:
        return AssistantMessage(content=self.text)

    def public_finish_reason(self, reason: str | None) -> str | None:
        return public_finish_reason(reason)

    def final(self) -> ChatChoice:
        return ChatChoice(index=self.index, message=self._message(),
                          logprobs=ChatChoiceLogprobs(content=self.logprobs) if self.want_logprobs else None,
                          finish_reason=self.public_finish_reason(self.finish_reason))
