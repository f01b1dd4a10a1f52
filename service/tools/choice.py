"""A chat choice whose reply may hold tool calls: content and calls are parsed out of the model text
as it streams, and sent as OpenAI sends them (delta.tool_calls with index; id, type and name first)."""

from __future__ import annotations

from typing import Any

from service.choices import ChatChoiceBuilder
from service.protocol import (
    AssistantMessage,
    ChatDelta,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from service.tools.calls import ParsedDelta
from service.tools.parser import ToolParser


class ToolChatChoiceBuilder(ChatChoiceBuilder):
    """One chat choice parsed by `parser`; `forced` (tool_choice required/named): the reply is only calls."""

    def __init__(self, index: int, tokenizer: Any, logprobs: bool, parser: ToolParser, forced: bool) -> None:
        super().__init__(index, tokenizer, logprobs)
        self.parser = parser
        self.forced = forced

    def role_chunk(self) -> ChatStreamChoice:
        if not self.forced:
            return super().role_chunk()
        self._sent_role = True  # a reply that is only calls has null content, as OpenAI streams it
        return ChatStreamChoice(index=self.index, delta=ChatDelta(role="assistant"))

    def _message_delta(self, text: str, finished: bool) -> ChatDelta | None:
        parsed = self.parser.feed(text)
        if finished:
            end = self.parser.finish()
            parsed = ParsedDelta(parsed.content + end.content, _merge_pieces(parsed.calls + end.calls))
        if not parsed:
            return None
        calls = [DeltaToolCall(index=piece.index, id=piece.id, type="function" if piece.id else None,
                               function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))
                 for piece in parsed.calls]
        return ChatDelta(content=parsed.content or None, tool_calls=calls or None)

    def _message(self) -> AssistantMessage:
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in self.parser.calls]
        if not calls:
            return AssistantMessage(content=self.parser.content)
        return AssistantMessage(content=self.parser.content or None, tool_calls=calls)

    def public_finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.parser.calls:
            return "tool_calls"
        return super().public_finish_reason(reason)


def _merge_pieces(pieces: list[Any]) -> list[Any]:
    """Pieces of one call next to each other become one (a header and its first arguments)."""
    merged: list[Any] = []
    for piece in pieces:
        if merged and merged[-1].index == piece.index and piece.id is None:
            merged[-1].arguments += piece.arguments
        else:
            merged.append(piece)
    return merged
