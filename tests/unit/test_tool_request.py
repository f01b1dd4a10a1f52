"""How a request's tools shape it: the parser and constraint chosen per tool_choice, the forced-call
schemas, the --chat-template and --tool-call-parser settings, and choices built from streamed text."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from engine.outputs import CompletionOutput
from service.cli import build_parser, main, settings_from_args
from service.protocol import ChatCompletionChunk, ChatCompletionRequest
from service.tools.choice import ToolChatChoiceBuilder
from service.tools.forced import NamedCallParser, RequiredCallsParser
from service.tools.hermes import HermesToolParser
from service.tools.llama3_json import Llama3JsonToolParser
from service.tools.mistral import MistralToolParser
from service.tools.request import plan_tools

PARAMS = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": PARAMS}},
         {"type": "function", "function": {"name": "now"}}]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_picks_parser_and_constraint() -> None:
    assert plan_tools(request(), None, None).make_parser is None  # no tools: plain text
    auto = plan_tools(request(tools=TOOLS), "{{ '[TOOL_CALLS]' }}", None)
    assert auto.make_parser is MistralToolParser and auto.structured_output is None and auto.needs_special_tokens
    assert plan_tools(request(tools=TOOLS), "{{ '[TOOL_CALLS]' }}", "llama3_json").make_parser is Llama3JsonToolParser
    none = plan_tools(request(tools=TOOLS, tool_choice="none"), None, None)
    assert none.make_parser is None and none.template_tools == TOOLS  # the template still shows the tools
    named = plan_tools(request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "search"}}),
                       None, None)
    assert isinstance(named.make_parser(), NamedCallParser) and named.forced and not named.needs_special_tokens
    assert json.loads(named.structured_output.spec) == PARAMS
    required = plan_tools(request(tools=TOOLS, tool_choice="required"), None, "hermes")
    assert required.make_parser is RequiredCallsParser and required.structured_output.kind == "json"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_schema_accepts_only_calls_of_the_given_functions(parallel: bool) -> None:
    plan = plan_tools(request(tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel), None, None)
    schema = json.loads(plan.structured_output.spec)
    one = {"name": "search", "arguments": {"q": "x"}}
    two = [one, {"name": "now", "arguments": {}}]
    jsonschema.validate([one], schema)
    bad = [[], [{"name": "other", "arguments": {}}], [{"name": "search", "arguments": {}}],
           [{"name": "search", "arguments": {"q": "x"}, "extra": 1}]]
    for calls in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(calls, schema)
    if parallel:
        jsonschema.validate(two, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(two, schema)


def test_builder_streams_what_it_finally_answers() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "search", "arguments": {"q": "kv cache"}}\n</tool_call>'
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    builder = ToolChatChoiceBuilder(0, tokenizer=None, logprobs=False, parser=HermesToolParser(), forced=False)
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        chunk = builder.delta(CompletionOutput(0, delta_text=piece, delta_token_ids=[1],
                                               finish_reason="stop" if last else None))
        if chunk is not None:
            chunks.append(ChatCompletionChunk(id="x", model="m", choices=[chunk]).model_dump(mode="json"))
    final = builder.final()
    assert final.finish_reason == "tool_calls" and final.message.content == "Checking."
    [call] = final.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("search", {"q": "kv cache"})
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == "Checking."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert calls[0] == {"index": 0, "id": call.id, "type": "function",
                        "function": {"name": "search", "arguments": calls[0]["function"]["arguments"]}}
    assert "".join(t["function"].get("arguments", "") for t in calls) == call.function.arguments
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_length_cut_keeps_finish_reason_length() -> None:
    builder = ToolChatChoiceBuilder(0, None, False, NamedCallParser("search"), forced=True)
    assert builder.role_chunk().delta.model_dump() == {"role": "assistant"}
    builder.delta(CompletionOutput(0, delta_text='{"q": "unfini', delta_token_ids=[1], finish_reason="length"))
    final = builder.final()
    assert final.finish_reason == "length" and final.message.tool_calls[0].function.arguments == '{"q": "unfini'


def test_chat_template_and_parser_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    args = build_parser().parse_args(["serve", "--chat-template", str(template), "--tool-call-parser", "mistral"])
    settings = settings_from_args(args)
    assert settings.chat_template == "{{ messages[0]['content'] }}" and settings.tool_call_parser == "mistral"
    assert main(["serve", "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "chat_template" in capsys.readouterr().err
    assert main(["serve", "--tool-call-parser", "pythonic"]) == 2
    assert "tool_call_parser" in capsys.readouterr().err
