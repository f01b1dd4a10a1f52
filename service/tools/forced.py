"""Parsers and JSON schemas for tool_choice "required" and a named function, where constrained
decoding makes the model write only the call(s): no tags, no text."""

from __future__ import annotations

import json
from typing import Any

from service.tools.call_array import CallArrayReader
from service.tools.parser import ToolParser

ANY_OBJECT: dict[str, Any] = {"type": "object"}


class NamedCallParser(ToolParser):
    """tool_choice {"type": "function", ...}: the whole output is that function's arguments object."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self._index = self._open_call(function_name)
        self._arguments = ""

    def _consume(self, text: str) -> None:
        self._arguments += text
        self._grow_arguments(self._index, self._arguments.lstrip())

    def _end(self) -> None:
        if not self._arguments.strip():
            self._grow_arguments(self._index, "{}")

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        raise NotImplementedError("a named tool choice has no text format of its own")


class RequiredCallsParser(ToolParser):
    """tool_choice "required": the output is a JSON array of {"name", "arguments"} objects."""

    name = "required"

    def __init__(self) -> None:
        super().__init__()
        self._array = CallArrayReader(self)

    def _consume(self, text: str) -> None:
        if not self._array.done:
            self._array.feed(text)

    def _end(self) -> None:
        pass

    @classmethod
    def render(cls, tool_calls: list[dict[str, Any]]) -> str:
        raise NotImplementedError("tool_choice required has no text format of its own")


def parameters_schema(function: Any) -> dict[str, Any]:
    """A function's parameters schema; none given means any object, as OpenAI treats it."""
    return function.parameters if function.parameters is not None else ANY_OBJECT


def named_call_schema(function: Any) -> str:
    """The JSON schema a named tool choice constrains the output to: the function's arguments."""
    return json.dumps(parameters_schema(function))


def required_calls_schema(functions: list[Any], parallel: bool) -> str:
    """The JSON schema of tool_choice "required": an array of calls, each naming one of the functions
    and giving arguments valid for it; exactly one call unless parallel tool calls are allowed."""
    variants = [{"type": "object",
                 "properties": {"name": {"type": "string", "enum": [f.name]}, "arguments": parameters_schema(f)},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for f in functions]
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return json.dumps(schema)
