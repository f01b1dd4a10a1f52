"""Tool-call parsers on fixed model texts: the calls and content found, and the same result however
the text is split into stream pieces (every split point, and one character at a time)."""

from __future__ import annotations

import json

import pytest

from service.tools import PARSERS, detect_parser
from service.tools.forced import NamedCallParser, RequiredCallsParser
from service.tools.hermes import HermesToolParser
from service.tools.llama3_json import Llama3JsonToolParser
from service.tools.mistral import MistralToolParser
from service.tools.parser import ToolParser

WEATHER = {"city": "Paris", "days": [1, 2], "unit": {"name": "celsius", "note": "a \"quoted\" } brace"}}

# (parser factory, model text, expected content, expected [(name, arguments as parsed JSON)])
CASES = [
    (HermesToolParser, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     + json.dumps(WEATHER) + '}\n</tool_call>', "Let me check.", [("get_weather", WEATHER)]),
    (HermesToolParser, '<tool_call>{"arguments": {"a": 1}, "name": "first"}</tool_call>\n'
     '<tool_call>{"name": "second", "arguments": {}}</tool_call>', None, [("first", {"a": 1}), ("second", {})]),
    (HermesToolParser, "No tools needed: 1 < 2 and <tool is not a tag.\n", "No tools needed: 1 < 2 and <tool is "
     "not a tag.\n", []),
    (HermesToolParser, '<tool_call>{"name": "encoded", "arguments": "{\\"x\\": [1]}"}</tool_call>', None,
     [("encoded", {"x": [1]})]),
    (HermesToolParser, '<tool_call>{"name": "no_args"}</tool_call>', None, [("no_args", {})]),
    (HermesToolParser, "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (Llama3JsonToolParser, '{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + "}", None,
     [("get_weather", WEATHER)]),
    (Llama3JsonToolParser, '<|python_tag|>{"name": "a", "parameters": {"n": 1}}; {"name": "b", "parameters": {}}',
     None, [("a", {"n": 1}), ("b", {})]),
    (Llama3JsonToolParser, '{"answer": 42}', '{"answer": 42}', []),
    (Llama3JsonToolParser, "  The answer is {42}.", "  The answer is {42}.", []),
    (MistralToolParser, 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER)
     + '}, {"name": "b", "arguments": {"k": "v"}}]', "Sure.", [("get_weather", WEATHER), ("b", {"k": "v"})]),
    (MistralToolParser, "Plain [TOOL text] only", "Plain [TOOL text] only", []),
    (MistralToolParser, 'Sure. [TOOL_CALLS]get_weather[ARGS]' + json.dumps(WEATHER) + '[TOOL_CALLS]b[ARGS]{"k": "v"}',
     "Sure.", [("get_weather", WEATHER), ("b", {"k": "v"})]),
    (lambda: NamedCallParser("get_weather"), json.dumps(WEATHER), None, [("get_weather", WEATHER)]),
    (RequiredCallsParser, '[{"name": "a", "arguments": {"q": "[x]"}}, {"name": "b", "arguments": {}}]', None,
     [("a", {"q": "[x]"}), ("b", {})]),
]


def run(parser: ToolParser, pieces: list[str]) -> tuple[str, dict[int, dict[str, str]]]:
    """Feed pieces and reassemble the stream as a client does: content text, and calls by index."""
    content, calls = "", {}
    for delta in [*(parser.feed(piece) for piece in pieces), parser.finish()]:
        content += delta.content
        for piece in delta.calls:
            if piece.id is not None:
                assert piece.index == len(calls), "a call's first piece carries its id and name"
                calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": ""}
            calls[piece.index]["arguments"] += piece.arguments
    return content, calls


@pytest.mark.parametrize(("make", "text", "content", "expected"), CASES)
def test_parse_in_one_piece(make, text: str, content: str | None, expected: list) -> None:
    parser = make()
    streamed_content, streamed = run(parser, [text])
    assert (parser.content or None) == content
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == expected
    assert streamed_content == parser.content
    assert [(c["id"], c["name"], c["arguments"]) for c in streamed.values()] == \
        [(c.id, c.name, c.arguments) for c in parser.calls]


@pytest.mark.parametrize(("make", "text", "content", "expected"), CASES)
def test_every_split_point_gives_the_same_result(make, text: str, content: str | None, expected: list) -> None:
    whole = make()
    run(whole, [text])
    splits = [[text[:i], text[i:]] for i in range(1, len(text))] + [list(text)]
    splits += [[text[:i], text[i:j], text[j:]] for i in range(1, len(text), 7) for j in range(i + 1, len(text), 5)]
    for pieces in splits:
        parser = make()
        streamed_content, streamed = run(parser, pieces)
        assert streamed_content == whole.content, pieces
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == \
            [(c.name, c.arguments) for c in whole.calls], pieces


def test_text_that_may_start_a_tag_is_held_back_until_decided() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hi <tool").content == "Hi"
    assert parser.feed("box>").content == " <toolbox>"
    parser = HermesToolParser()
    assert parser.feed("Hi <tool").content == "Hi"
    delta = parser.feed('_call>{"name": "f", "argu')
    assert delta.content == "" and [(p.index, p.name, p.arguments) for p in delta.calls] == [(0, "f", "")]
    assert [p.arguments for p in parser.feed('ments": {"a": ').calls] == ['{"a": ']


def test_ids_are_unique_and_in_each_formats_shape() -> None:
    parser = HermesToolParser()
    run(parser, ['<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>'])
    ids = [c.id for c in parser.calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") and len(i) == 29 for i in ids)
    mistral = MistralToolParser()
    run(mistral, ['[TOOL_CALLS][{"name": "a", "arguments": {}}]'])
    assert len(mistral.calls[0].id) == 9 and mistral.calls[0].id.isalnum()


@pytest.mark.parametrize("parser_class", list(PARSERS.values()))
def test_render_then_parse_round_trips(parser_class: type[ToolParser]) -> None:
    calls = [{"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(WEATHER)}},
             {"id": "y", "type": "function", "function": {"name": "noop", "arguments": {}}}]
    parser = parser_class()
    run(parser, [parser_class.render(calls)])
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", WEATHER), ("noop", {})]


def test_parser_is_detected_from_the_chat_template() -> None:
    assert detect_parser("{{ '<tool_call>' }}") is HermesToolParser
    assert detect_parser("{{ '[TOOL_CALLS]' }}") is MistralToolParser
    assert detect_parser("{{ '<|python_tag|>' }}") is Llama3JsonToolParser
    assert detect_parser("{{ messages }}") is HermesToolParser
    assert detect_parser(None) is HermesToolParser


def test_parser_names_match_the_setting() -> None:
    from typing import get_args

    from service.settings import ToolCallParserName

    assert set(PARSERS) == set(get_args(ToolCallParserName))
