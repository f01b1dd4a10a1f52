"""The base of every tool-call parser: model text in, content and tool call pieces out, the same
whether the text comes in one piece or token by token."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from service.tools.calls import CallPiece, ParsedCall, ParsedDelta, openai_call_id
from service.tools.json_scan import CallObjectScanner


class ToolParser(ABC):
    """Feed model text with feed(), end with finish(); `calls` and `content` hold the result.

    Content that might be the start of a tool call (a partial tag) is held back until decided, and
    whitespace at the edge of a tool call is dropped, so streamed and one-piece parses agree exactly.
    """

    name: ClassVar[str]
    # Whether the tool-call markers are special tokens the detokenizer must keep in the text.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self) -> None:
        self.calls: list[ParsedCall] = []
        self.content = ""
        self._pending = ParsedDelta()
        self._held_whitespace = ""
        self._scanner: CallObjectScanner | None = None
        self._scanner_call: int | None = None

    def feed(self, text: str) -> ParsedDelta:
        """Absorb the next piece of model text; what became certain."""
        if text:
            self._consume(text)
        return self._take()

    def finish(self) -> ParsedDelta:
        """The text has ended: release what was held back."""
        self._end()
        if not self.calls:
            self._add_content("", final=True)  # whitespace at the end of a plain answer is part of it
        self._held_whitespace = ""
        return self._take()

    @abstractmethod
    def _consume(self, text: str) -> None:
        """Parse more text, calling _add_content and scan_call."""

    @abstractmethod
    def _end(self) -> None:
        """Flush state at the end of the text."""

    @classmethod
    @abstractmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        """Tool calls (OpenAI message shape, arguments as dicts) as this format's model text."""

    def new_call_id(self) -> str:
        return openai_call_id()

    # ---- helpers for the formats ----------------------------------------------------------------

    def _add_content(self, text: str, final: bool = False) -> None:
        """Text outside tool calls; trailing whitespace waits to see what follows it."""
        text = self._held_whitespace + text
        kept = text if final else text.rstrip()
        self._held_whitespace = text[len(kept):]
        if kept:
            self.content += kept
            self._pending.content += kept

    def _drop_held_whitespace(self) -> None:
        self._held_whitespace = ""

    def start_call_scan(self) -> None:
        """A call object starts here (whitespace before it is dropped)."""
        self._drop_held_whitespace()
        self._scanner = CallObjectScanner()
        self._scanner_call = None

    @property
    def scan_done(self) -> bool:
        return self._scanner is not None and self._scanner.done

    def scan_call(self, text: str) -> int:
        """Feed the call being scanned; returns the characters it used. Its call is opened once the name
        is known, and its arguments follow as they grow."""
        assert self._scanner is not None
        used = self._scanner.feed(text)
        if self._scanner.name is not None:
            if self._scanner_call is None:
                self._scanner_call = self._open_call(self._scanner.name)
            self._grow_arguments(self._scanner_call, self._scanner.arguments())
        return used

    def _open_call(self, name: str, call_id: str | None = None) -> int:
        index = len(self.calls)
        call = ParsedCall(id=call_id or self.new_call_id(), name=name)
        self.calls.append(call)
        self._pending.calls.append(CallPiece(index=index, id=call.id, name=name))
        return index

    def _grow_arguments(self, index: int, arguments: str) -> None:
        call = self.calls[index]
        if len(arguments) <= len(call.arguments) or not arguments.startswith(call.arguments):
            return
        piece = arguments[len(call.arguments):]
        call.arguments = arguments
        last = self._pending.calls[-1] if self._pending.calls else None
        if last is not None and last.index == index:
            last.arguments += piece
        else:
            self._pending.calls.append(CallPiece(index=index, arguments=piece))

    def _take(self) -> ParsedDelta:
        delta, self._pending = self._pending, ParsedDelta()
        return delta


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (held back in case it is)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
