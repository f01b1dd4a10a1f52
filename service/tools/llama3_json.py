"""Llama 3.x JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}` (after an optional
<|python_tag|>), several separated by `;`. A reply that does not start so is plain text."""

from __future__ import annotations

import json
from typing import Any

from service.tools.calls import call_object
from service.tools.parser import ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._state = "start"  # start, call, between, text
        self._raw_since_start = ""  # held text, shown as content if the reply proves not to be calls

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._buffer:
            if self._state == "text":
                self._add_content(self._buffer)
                self._buffer = ""
            elif self._state in ("start", "between"):
                stripped = self._buffer.lstrip()
                if self._state == "start" and stripped.startswith(PYTHON_TAG):
                    stripped = stripped[len(PYTHON_TAG):].lstrip()
                if not stripped or (self._state == "start" and PYTHON_TAG.startswith(stripped)):
                    return
                if self._state == "between" and stripped[0] == ";":
                    stripped = stripped[1:].lstrip()
                    if not stripped:
                        self._buffer = ""
                        return
                if stripped[0] != "{":
                    self._state = "text"
                    if not self.calls:  # plain text from the start: keep it exactly
                        stripped = self._buffer
                    self._buffer = stripped
                    continue
                self._raw_since_start += self._buffer[:len(self._buffer) - len(stripped)]
                self._buffer = stripped
                self.start_call_scan()
                self._state = "call"
            else:
                used = self.scan_call(self._buffer)
                self._raw_since_start += self._buffer[:used]
                self._buffer = self._buffer[used:]
                if not self.scan_done:
                    return
                if self._scanner_call is None:  # JSON but not a call: the rest of the reply is text
                    self._state, self._buffer = "text", self._raw_since_start + self._buffer
                else:
                    self._state = "between"
                self._raw_since_start = ""

    def _end(self) -> None:
        if self._state == "call" and self._scanner_call is None:
            self._add_content(self._raw_since_start)
        elif self._state == "start" or (self._state == "text" and self._buffer):
            self._add_content(self._buffer)
        self._buffer = ""

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        return "; ".join(json.dumps(call_object(call, "parameters"), ensure_ascii=False) for call in tool_calls)
