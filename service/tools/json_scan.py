"""Scan a tool call's JSON object as it streams in: find its end, its name, and the raw text of its
arguments, without waiting for the whole object. Validity is the model's (or the grammar's) business:
this only tracks strings, nesting and top-level keys."""

from __future__ import annotations

import json

_WHITESPACE = " \t\r\n"


class CallObjectScanner:
    """Feed the text of one `{"name": ..., "arguments": {...}}` object; keys may come in any order."""

    def __init__(self, name_keys: tuple[str, ...] = ("name",),
                 argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self._name_keys, self._argument_keys = name_keys, argument_keys
        self.raw = ""
        self.done = False
        self.name: str | None = None
        self._depth = 0
        self._in_string = self._escaped = False
        self._expect = "open"  # at depth 1: key, colon, value, after (a value ended)
        self._token_start = 0  # where the key or top-level value being read starts
        self._key: str | None = None
        self._args_start: int | None = None
        self._args_end: int | None = None

    def feed(self, text: str) -> int:
        """Consume text up to the end of the object; returns how many characters were used."""
        for used, char in enumerate(text, start=1):
            if self.done:
                return used - 1
            self.raw += char
            self._step(char, len(self.raw) - 1)
        return len(text)

    @property
    def started(self) -> bool:
        return self._expect != "open"

    def arguments(self) -> str:
        """The arguments' JSON text so far. An object streams as written; a string (some models encode
        the arguments as one) and other values appear once complete; none at all reads as {}."""
        if self._args_start is None:
            return "{}" if self.done else ""
        if self.raw[self._args_start] == "{":
            return self.raw[self._args_start:self._args_end]
        if self._args_end is None:
            return ""
        value_text = self.raw[self._args_start:self._args_end]
        if value_text.startswith('"'):
            try:
                value = json.loads(value_text)
            except json.JSONDecodeError:
                return value_text
            return value if isinstance(value, str) else value_text
        return value_text

    def _step(self, char: str, pos: int) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._depth == 1:
                    self._end_top_token(pos + 1)
            return
        if self._expect == "open":
            if char == "{":
                self._depth, self._expect = 1, "key"
            elif char not in _WHITESPACE:
                self.done = True  # not an object: the caller sees done with no name
            return
        if char == '"':
            self._in_string = True
            if self._depth == 1:
                self._start_top_token(pos)
        elif char in "{[":
            if self._depth == 1:
                self._start_top_token(pos)
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth == 1:
                self._end_top_token(pos + 1)
            elif self._depth == 0:
                if self._expect == "value":  # a number, true, false or null ends at the brace
                    self._end_top_token(pos)
                self.done = True
        elif self._depth == 1:
            if char == ":" and self._expect == "colon":
                self._expect = "value_start"
            elif char == ",":
                if self._expect == "value":
                    self._end_top_token(pos)
                self._expect = "key"
            elif char not in _WHITESPACE and self._expect == "value_start":
                self._start_top_token(pos)  # a number, true, false or null

    def _start_top_token(self, pos: int) -> None:
        self._token_start = pos
        if self._expect == "value_start":
            self._expect = "value"
            if self._key in self._argument_keys:
                self._args_start = pos

    def _end_top_token(self, end: int) -> None:
        text = self.raw[self._token_start:end]
        if self._expect == "key":
            self._key = _loads(text)
            self._expect = "colon"
        elif self._expect == "value":
            self._expect = "after"
            if self._key in self._name_keys and isinstance(name := _loads(text), str) and name:
                self.name = name
            elif self._key in self._argument_keys and self._args_start == self._token_start:
                self._args_end = end


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
