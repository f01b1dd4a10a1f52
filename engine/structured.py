"""Constrained decoding: what a request asks the output to match (a JSON schema, a regex, a choice, a grammar).

StructuredOutput is the engine-side description; the service maps OpenAI's `response_format`, vLLM's
`structured_outputs` and `guided_*` fields onto it. Compiling it into a token mask lives beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `spec` by kind: json -> the JSON schema as a JSON string;
    choice -> a tuple of strings; regex / grammar -> the pattern / EBNF (GBNF) text; json_object -> None."""

    kind: StructuredKind
    spec: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind == "json_object":
            if self.spec is not None:
                raise ValueError("json_object takes no spec")
        elif self.kind == "choice":
            if not isinstance(self.spec, tuple) or not self.spec or not all(isinstance(c, str) for c in self.spec):
                raise ValueError("choice needs a non-empty tuple of strings")
        elif self.kind in ("json", "regex", "grammar"):
            if not isinstance(self.spec, str) or not self.spec:
                raise ValueError(f"{self.kind} needs a non-empty string spec")
        else:
            raise ValueError(f"unknown structured output kind {self.kind!r}")
