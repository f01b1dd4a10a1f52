"""Mistral tool calls: text, then [TOOL_CALLS] and a JSON array of {"name", "arguments"} objects
(the v3 tokenizer's format; its ids are 9 letters and digits, which Mistral's templates check)."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from service.tools.call_array import CallArrayReader
from service.tools.calls import call_object
from service.tools.parser import ToolParser, partial_suffix

TOOL_CALLS = "[TOOL_CALLS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] is a control token

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._array: CallArrayReader | None = None

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._buffer:
            if self._array is None or self._array.done:
                at = self._buffer.find(TOOL_CALLS)
                if at < 0:
                    keep = partial_suffix(self._buffer, TOOL_CALLS)
                    self._add_content(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return
                self._add_content(self._buffer[:at])
                self._drop_held_whitespace()
                self._buffer = self._buffer[at + len(TOOL_CALLS):]
                self._array = CallArrayReader(self)
            used = self._array.feed(self._buffer)
            self._buffer = self._buffer[used:]
            if not self._array.done:
                return

    def _end(self) -> None:
        if self._array is None or self._array.done:
            self._add_content(self._buffer)
        self._buffer = ""

    def new_call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        return TOOL_CALLS + json.dumps([call_object(call) for call in tool_calls], ensure_ascii=False)
