"""Request fields for constrained decoding -> engine StructuredOutput, checked and compiled before the
request reaches the engine.

Accepted, on chat and completions: OpenAI's `response_format` (json_schema, json_object, text), vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object) and its older `guided_json`,
`guided_regex`, `guided_choice` and `guided_grammar`. At most one constraint per request; everything that
cannot be enforced is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from engine.grammar import GrammarError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutput
from service.errors import APIError
from service.protocol import StructuredOutputFields
from service.state import ServerState


async def apply_structured_output(state: ServerState, body: StructuredOutputFields,
                                  params: list[SamplingParams]) -> list[SamplingParams]:
    """`params` with the request's structured output set, compiled off the event loop and the step loop."""
    found = structured_output_of(body)
    if found is None:
        return params
    spec, param = found
    grammars = getattr(state.require_engine(), "grammars", None)
    if grammars is not None:  # None: a fake engine in unit tests
        try:
            await asyncio.to_thread(grammars.compile, spec)
        except GrammarError as exc:
            raise APIError(400, f"{param}: {_describe(spec)} cannot be enforced: {exc}", param=param) from exc
    return [dataclasses.replace(p, structured_output=spec) for p in params]


def structured_output_of(body: StructuredOutputFields) -> tuple[StructuredOutput, str] | None:
    """The one constraint the request asks for and the field it came from; APIError if several or malformed."""
    given = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                               "guided_choice", "guided_grammar") if getattr(body, name) is not None]
    if body.response_format is not None and body.response_format.type == "text":
        given.remove("response_format")
    if len(given) > 1:
        raise APIError(400, f"give at most one structured-output constraint; this request has {', '.join(given)}",
                       param=given[1])
    if not given:
        return None
    if given[0] == "response_format":
        return _from_response_format(body)
    if given[0] == "structured_outputs":
        return _from_structured_outputs(body)
    return _spec(given[0].removeprefix("guided_"), getattr(body, given[0]), given[0])


def _from_response_format(body: StructuredOutputFields) -> tuple[StructuredOutput, str]:
    fmt = body.response_format
    assert fmt is not None
    if fmt.type == "json_object":
        return StructuredOutput("json_object", None), "response_format"
    if fmt.json_schema is None:
        raise APIError(400, "response_format.json_schema is required when type is 'json_schema'",
                       param="response_format.json_schema")
    schema = fmt.json_schema.json_schema
    if schema is None:  # OpenAI: no schema means any JSON value is fine; an object is what clients expect
        return StructuredOutput("json_object", None), "response_format.json_schema"
    return _spec("json", schema, "response_format.json_schema.schema")


def _from_structured_outputs(body: StructuredOutputFields) -> tuple[StructuredOutput, str]:
    so = body.structured_outputs
    assert so is not None
    given = {name: value for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                             ("grammar", so.grammar)) if value is not None}
    if so.json_object:
        given["json_object"] = True
    if len(given) != 1:
        what = ", ".join(given) if given else "none"
        raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                            f"got {what}", param="structured_outputs")
    kind, value = next(iter(given.items()))
    if kind == "json_object":
        return StructuredOutput("json_object", None), "structured_outputs.json_object"
    return _spec(kind, value, f"structured_outputs.{kind}")


def _spec(kind: str, value: Any, param: str) -> tuple[StructuredOutput, str]:
    """A StructuredOutput of `kind` from the request field `param` (a schema may come as an object or as JSON
    text), with that field's name."""
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{param}: the JSON schema is not valid JSON: {exc}", param=param) from exc
        if not isinstance(schema, dict | bool):
            raise APIError(400, f"{param}: a JSON schema must be an object", param=param)
        return StructuredOutput("json", json.dumps(schema)), param  # key order kept: the output's property order
    if kind == "choice":
        if not value or any(not c for c in value):
            raise APIError(400, f"{param}: choices must be non-empty strings", param=param)
        return StructuredOutput("choice", tuple(value)), param
    if not value:
        raise APIError(400, f"{param} must not be empty", param=param)
    return StructuredOutput(kind, value), param  # type: ignore[arg-type]  # regex or grammar


def _describe(spec: StructuredOutput) -> str:
    return {"json": "the JSON schema", "json_object": "json_object", "regex": "the regex",
            "choice": "the choice", "grammar": "the grammar"}[spec.kind]
