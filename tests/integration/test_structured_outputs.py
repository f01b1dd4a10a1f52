"""Structured outputs on a live server, through the official `openai` client and LangChain: whenever
finish_reason is "stop", the output validates against the schema (matches the regex, is a choice)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import httpx
import jsonschema
import pytest
from live_server import API_KEY, SERVED_NAME, LiveServer
from openai import OpenAI
from pydantic import BaseModel, Field

ASK = [{"role": "user", "content": "Describe a person who lives in a city, as JSON."}]

# Our own schemas: nested objects, arrays with minItems/maxItems, enums, patterns, anyOf, bounded numbers.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height_m": {"type": "number", "minimum": 1.2, "maximum": 2.3},
        "role": {"enum": ["engineer", "teacher", "artist"]},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de", "es"]}, "minItems": 1, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"},
                          {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                            "legs": {"type": "integer", "minimum": 0,
                                                                     "maximum": 4}},
                           "required": ["kind", "legs"], "additionalProperties": False}]},
    },
    "required": ["name", "age", "height_m", "role", "address", "languages", "pet"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


class Address(BaseModel):
    city: str = Field(max_length=20)
    country: Literal["France", "Japan", "Peru"]


class Resident(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    address: Address
    hobbies: list[Annotated[str, Field(max_length=20)]] = Field(min_length=1, max_length=3)


def stopped_outputs_validate(texts_and_reasons: list[tuple[str, str | None]], check) -> int:
    """Validate every output that finished with "stop"; how many did."""
    stopped = 0
    for text, reason in texts_and_reasons:
        assert reason in ("stop", "length"), reason
        if reason == "stop":
            check(text)
            stopped += 1
    return stopped


def validates(text: str) -> None:
    jsonschema.validate(json.loads(text), PERSON)


def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    reply = client.chat.completions.parse(model=SERVED_NAME, messages=ASK, response_format=Resident,
                                          max_tokens=200, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Resident)
    assert Resident.model_validate_json(choice.message.content) == choice.message.parsed


def test_own_schema_greedy_sampled_n_and_streamed(client: OpenAI) -> None:
    greedy = client.chat.completions.create(model=SERVED_NAME, messages=ASK, response_format=JSON_SCHEMA_FORMAT,
                                            max_tokens=200, temperature=0)
    sampled = dict(model=SERVED_NAME, messages=ASK, response_format=JSON_SCHEMA_FORMAT, max_tokens=200,
                   temperature=1.0, seed=7, n=2)
    whole = client.chat.completions.create(**sampled)
    texts, reasons = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**sampled, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    # Seeded samples do not depend on the batch, so the stream repeats the same two outputs.
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    results = [(c.message.content, c.finish_reason) for c in greedy.choices + whole.choices]
    assert stopped_outputs_validate(results, validates) >= 2


def test_completions_endpoint_and_length(client: OpenAI) -> None:
    reply = client.completions.create(model=SERVED_NAME, prompt="A person record in JSON:", max_tokens=200,
                                      temperature=0.8, seed=3, extra_body={"response_format": JSON_SCHEMA_FORMAT})
    assert stopped_outputs_validate([(c.text, c.finish_reason) for c in reply.choices], validates) >= 1
    cut = client.chat.completions.create(model=SERVED_NAME, messages=ASK, response_format=JSON_SCHEMA_FORMAT,
                                         max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5


def test_json_object(client: OpenAI) -> None:
    reply = client.chat.completions.create(model=SERVED_NAME, messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=80, temperature=0)
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"regex": r"[A-Z][a-z]{2,8}, [0-9]{4}"}},
    {"guided_regex": r"[A-Z][a-z]{2,8}, [0-9]{4}"},
])
def test_regex(client: OpenAI, extra: dict) -> None:
    reply = client.chat.completions.create(model=SERVED_NAME, messages=[
        {"role": "user", "content": "Name a city and a year."}], max_tokens=30, temperature=1.0, seed=4, n=2,
        extra_body=extra)
    for c in reply.choices:
        assert c.finish_reason == "stop" and re.fullmatch(r"[A-Z][a-z]{2,8}, [0-9]{4}", c.message.content)


@pytest.mark.parametrize("extra", [{"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
                                   {"guided_choice": ["positive", "negative", "neutral"]}])
def test_choice_streamed(client: OpenAI, extra: dict) -> None:
    chunks = client.completions.create(model=SERVED_NAME, prompt="Review: 'I loved it!' Sentiment:", max_tokens=10,
                                       temperature=1.0, seed=1, stream=True, extra_body=extra)
    text, reason = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
    assert reason == "stop" and text in ("positive", "negative", "neutral")


def test_gbnf_grammar(client: OpenAI) -> None:
    grammar = 'root ::= answer " because " reason\nanswer ::= "yes" | "no"\nreason ::= [a-z ]{3,20} "."'
    reply = client.chat.completions.create(model=SERVED_NAME, messages=[
        {"role": "user", "content": "Is the sky blue?"}], max_tokens=40, temperature=0,
        extra_body={"structured_outputs": {"grammar": grammar}})
    c = reply.choices[0]
    assert c.finish_reason == "stop" and re.fullmatch(r"(yes|no) because [a-z ]{3,20}\.", c.message.content)


def test_langchain_with_structured_output(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, model=SERVED_NAME, temperature=0,
                     max_tokens=200, max_retries=0)
    structured = llm.with_structured_output(Resident, method="json_schema")
    result = structured.invoke("Describe a person who lives in a city.")
    assert isinstance(result, Resident)


def test_unknown_fields_ignored_on_every_endpoint(client: OpenAI, http: httpx.Client) -> None:
    reply = client.chat.completions.create(model=SERVED_NAME, messages=ASK, max_tokens=2, store=True,
                                           metadata={"team": "a"}, service_tier="auto", parallel_tool_calls=False,
                                           extra_body={"frobnicate": 1})
    assert reply.choices[0].message.content is not None
    for path, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "store": False, "suffixes": 1,
                                            "stream": True, "stream_options": {"include_usage": True,
                                                                               "include_obfuscation": False}}),
                       ("/tokenize", {"prompt": "Hi", "whatever": 1}), ("/detokenize", {"tokens": [1], "x": 0})):
        assert http.post(path, json=body).status_code == 200, path
    bad = http.post("/v1/chat/completions", json={"messages": ASK, "temperature": "hot", "store": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


BAD = [
    ("not-json-schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "wat"}}}}, "response_format.json_schema.schema", "wat"),
    ("unsupported-feature", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema",
     "uniqueItems"),
    ("schema-string-not-json", {"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ("bad-regex", {"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
    ("bad-grammar", {"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "missing_rule"),
    ("both", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
     "structured_outputs", "response_format, structured_outputs"),
    ("two-in-structured-outputs", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    ("schema-wrong-type", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema", None),
    ("no-json-schema", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
]


@pytest.mark.parametrize(("case", "extra", "param", "text"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("stream", [False, True])
def test_unenforceable_constraints_get_400(http: httpx.Client, case: str, extra: dict, param: str,
                                           text: str | None, stream: bool) -> None:
    response = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, "stream": stream, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if text is not None:
        assert text in error["message"]
    assert http.get("/health").status_code == 200
