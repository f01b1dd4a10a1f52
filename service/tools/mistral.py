"""Mistral tool calls: text, then [TOOL_CALLS] and either a JSON array of {"name", "arguments"} objects
(tokenizer v3, Mistral 7B v0.3 and Nemo) or `name[ARGS]{...}` with [TOOL_CALLS] before each call
(tokenizer v11 and later). Ids are 9 letters and digits, which Mistral's templates check."""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from service.tools.call_array import CallArrayReader
from service.tools.calls import call_object
from service.tools.json_scan import CallObjectScanner
from service.tools.parser import ToolParser, partial_suffix

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] and [ARGS] are control tokens

    def __init__(self) -> None:
        super().__init__()
        self._buffer = ""
        self._state = "text"  # text, calls (after the marker), array, name, args
        self._array: CallArrayReader | None = None
        self._args: CallObjectScanner | None = None
        self._call = 0

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._buffer:
            if self._state == "text":
                at = self._buffer.find(TOOL_CALLS)
                if at < 0:
                    keep = partial_suffix(self._buffer, TOOL_CALLS)
                    self._add_content(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return
                self._add_content(self._buffer[:at])
                self._drop_held_whitespace()
                self._buffer, self._state = self._buffer[at + len(TOOL_CALLS):], "calls"
            elif self._state == "calls":  # which of the two formats follows the marker
                stripped = self._buffer.lstrip()
                if not stripped:
                    return
                self._buffer = stripped
                if stripped[0] == "[":
                    self._array, self._state = CallArrayReader(self), "array"
                else:
                    self._state = "name"
            elif self._state == "array":
                self._buffer = self._buffer[self._array.feed(self._buffer):]
                if self._array.done:
                    self._state = "text"
                else:
                    return
            elif self._state == "name":
                at = self._buffer.find(ARGS)
                if at < 0:
                    return
                self._call = self._open_call(self._buffer[:at].strip())
                self._buffer, self._state = self._buffer[at + len(ARGS):], "args"
                self._args = CallObjectScanner()
            else:  # the arguments object of name[ARGS]
                used = self._args.feed(self._buffer)
                self._buffer = self._buffer[used:]
                self._grow_arguments(self._call, self._args.raw.lstrip())
                if not self._args.done:
                    return
                self._state = "text"

    def _end(self) -> None:
        if self._state == "text":
            self._add_content(self._buffer)
        elif self._state == "name":  # a name that never got its [ARGS]: not a call after all
            self._add_content(self._buffer)
        self._buffer = ""

    def new_call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        return TOOL_CALLS + json.dumps([call_object(call) for call in tool_calls], ensure_ascii=False)
