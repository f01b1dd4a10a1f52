"""Text from clients must be valid Unicode. JSON can carry a lone UTF-16 surrogate ("\\ud800") that
Python's json accepts but nothing downstream can encode (the tokenizer, the log, a response body), so
request models reject it as a 400 naming the field, and error messages quote such text escaped."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_TEXTLESS = frozenset({int, float, bool, type(None)})


def _first_surrogate(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def find_lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """(where, the surrogate) of the first lone surrogate in a string, or in a list's items or a dict's
    keys and values at any depth; `where` is like "[2]" or "['key']". Nested models check themselves."""
    if isinstance(value, str):
        bad = _first_surrogate(value)
        return (where, bad) if bad is not None else None
    if isinstance(value, BaseModel):
        return None
    if isinstance(value, (list, tuple)):
        if _TEXTLESS.issuperset(map(type, value)):
            return None  # token-id lists (up to 1M ids) skip the loop below
        items: Any = ((f"{where}[{i}]", item) for i, item in enumerate(value))
    elif isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and (bad := _first_surrogate(key)) is not None:
                return f"{where}[{escape(key)!r}] (the key itself)", bad
        items = ((f"{where}[{escape(str(key))!r}]", item) for key, item in value.items())
    else:
        return None
    for place, item in items:
        found = find_lone_surrogate(item, place)
        if found is not None:
            return found
    return None


def reject_lone_surrogates(value: Any) -> Any:
    """A pydantic after-validator for any field: the value, or ValueError if its text is not valid Unicode."""
    found = find_lone_surrogate(value)
    if found is not None:
        where, surrogate = found
        at = f" at {where}" if where else ""
        raise ValueError(f"the text{at} contains a lone UTF-16 surrogate (U+{ord(surrogate):04X}), which is not "
                         "valid Unicode; send UTF-8 text, or escape a character beyond U+FFFF as a surrogate pair")
    return value


def escape(text: str) -> str:
    """`text` with any lone surrogate written as a \\udXXX escape, so that it encodes as UTF-8."""
    return text if _first_surrogate(text) is None else text.encode("utf-8", "backslashreplace").decode("utf-8")
