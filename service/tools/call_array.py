"""A JSON array of call objects, `[{"name": ..., "arguments": {...}}, ...]`: Mistral's format after
[TOOL_CALLS], and what tool_choice "required" makes the model write."""

from __future__ import annotations

from service.tools.parser import ToolParser


class CallArrayReader:
    """Reads one array of call objects for a parser; `done` when its closing bracket (or junk) is read."""

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self._state = "open"  # open, item, after_item, done
        self.done = False

    def feed(self, text: str) -> int:
        """Consume text up to the end of the array; returns how many characters were used."""
        used = 0
        while used < len(text) and not self.done:
            char = text[used]
            if self._state == "item":
                used += self._parser.scan_call(text[used:])
                if self._parser.scan_done:
                    self._state = "after_item"
                continue
            used += 1
            if char.isspace():
                continue
            if self._state == "open" and char == "[":
                self._state = "next"
            elif self._state == "next" and char == "{":
                self._parser.start_call_scan()
                self._state = "item"
                used -= 1  # the scanner reads the brace
            elif self._state == "after_item" and char == ",":
                self._state = "next"
            else:  # "]" or anything unexpected ends the array
                self.done = True
        return used
