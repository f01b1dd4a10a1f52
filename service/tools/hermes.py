"""Hermes-style tool calls (Qwen 2.5/3, Hermes 2 Pro, SmolLM3 templates):
text, then `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated."""

from __future__ import annotations

import json
from typing import Any

from service.tools.calls import call_object
from service.tools.parser import ToolParser, partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    needs_special_tokens = True  # some vocabularies make <tool_call> a special token

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""  # text not yet decided
        self._state = "text"  # text, call, close
        self._opened = ""  # the raw text of the call being read, for when it turns out not to be one

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._buffer:
            if self._state == "text":
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = partial_suffix(self._buffer, OPEN)
                    self._add_content(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return
                self._add_content(self._buffer[:at])
                self._buffer = self._buffer[at + len(OPEN):]
                self.start_call_scan()
                self._opened, self._state = OPEN, "call"
            elif self._state == "call":
                used = self.scan_call(self._buffer)
                self._opened += self._buffer[:used]
                self._buffer = self._buffer[used:]
                if not self.scan_done:
                    return
                if self._scanner_call is None:  # no name: it was text after all
                    self._add_content(self._opened)
                    self._state = "text"
                else:
                    self._state = "close"
            else:  # after a call: its close tag, if the model writes one
                stripped = self._buffer.lstrip()
                if not stripped or (CLOSE.startswith(stripped) and len(stripped) < len(CLOSE)):
                    return
                self._buffer = stripped[len(CLOSE):] if stripped.startswith(CLOSE) else stripped
                self._state = "text"

    def _end(self) -> None:
        if self._state == "text" and self._buffer:
            self._add_content(self._buffer)
        elif self._state == "call" and self._scanner_call is None:
            self._add_content(self._opened)
        self._buffer = ""

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        return "\n".join(f"{OPEN}\n{json.dumps(call_object(call), ensure_ascii=False)}\n{CLOSE}"
                         for call in tool_calls)

