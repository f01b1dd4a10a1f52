"""What a tool parser produces: finished tool calls and the stream pieces that build them."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCall:
    """One tool call as parsed so far; `arguments` is a JSON string that only ever grows."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class CallPiece:
    """What is new about call `index`: id and name the first time, then arguments text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass
class ParsedDelta:
    """The new content text and tool call pieces after one feed of model text."""

    content: str = ""
    calls: list[CallPiece] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


def openai_call_id() -> str:
    """An id in OpenAI's shape: call_ and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))


def call_object(call: dict[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    """{"name", arguments_key} of an OpenAI-shaped tool call (for rendering calls as model text)."""
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's JSON string; written out as the object it stands for
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"name": function.get("name"), arguments_key: arguments}
