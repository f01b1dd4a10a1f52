"""Chat templates: tools, tool calls and tool results rendered as transformers renders them; template
kwargs, continue_final_message, --chat-template values, and the one way text parts become text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.chat_template import ChatTemplate, content_text, load_chat_template
from service.tools.hermes import HermesToolParser
from service.tools.history import calls_as_text

TOOLS_TEMPLATE = Path(__file__).resolve().parents[2] / "service" / "chat_templates" / "chatml_tools.jinja"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ARGS = {"city": "Paris", "note": "ünïcode \"quoted\""}


def conversation(arguments: object) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
            {"role": "assistant", "content": "18 C."}]


def test_tools_template_renders_as_transformers_does() -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    source = TOOLS_TEMPLATE.read_text()
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    # transformers wants arguments as a dict; OpenAI clients send a JSON string, which kvserve decodes.
    expected = reference.apply_chat_template(conversation(ARGS), tools=TOOLS, chat_template=source, tokenize=False,
                                             add_generation_prompt=True)
    ours = ChatTemplate(source).render(conversation(json.dumps(ARGS)), tools=TOOLS)
    assert ours == expected
    assert '"arguments": {"city": "Paris", "note": "ünïcode \\"quoted\\""}' in ours
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in ours and '"name": "get_weather"' in ours


def test_template_kwargs_and_reserved_names() -> None:
    template = ChatTemplate("{{ greeting }} {{ messages[0]['content'] }}{% if tools %} {{ tools | length }}{% endif %}")
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages, template_kwargs={"greeting": "hey"}, tools=TOOLS) == "hey x 1"
    with pytest.raises(ValueError, match="may not set messages, tools"):
        template.render(messages, template_kwargs={"tools": [], "messages": []})


def test_continue_final_message_cuts_after_the_final_text() -> None:
    template = ChatTemplate("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is "}]
    assert template.render(messages, add_generation_prompt=False, continue_final_message=True) == \
        "<user>hi</s><assistant>The answer is"
    with pytest.raises(ValueError, match="cannot both be true"):
        template.render(messages, continue_final_message=True)
    with pytest.raises(ValueError, match="assistant"):
        template.render(messages[:1], add_generation_prompt=False, continue_final_message=True)


def test_text_parts_become_text_in_one_way() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert content_text(parts) == "a\nb"
    rendered = ChatTemplate("{{ messages[0]['content'] }}").render([{"role": "user", "content": parts}])
    assert rendered == "a\nb"
    with pytest.raises(ValueError, match="only parts of the form"):
        content_text([{"type": "image_url", "image_url": {"url": "x"}}])


def test_template_errors_are_value_errors() -> None:
    adds_none = ChatTemplate("{{ '<s>' + messages[0]['content'] }}")  # SmolLM2-style concatenation
    with pytest.raises(ValueError, match="rejected"):
        adds_none.render([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}])
    with pytest.raises(ValueError, match="invalid chat template"):
        ChatTemplate("{% for %}")


def test_load_chat_template_from_file_or_text(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages | length }}")
    assert load_chat_template(str(path)) == "{{ messages | length }}"
    assert load_chat_template("{{ 'inline' }}") == "{{ 'inline' }}"
    with pytest.raises(ValueError, match="neither a readable file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="invalid chat template"):
        load_chat_template("{% if %}")


def test_templates_without_tool_calls_see_past_calls_as_text() -> None:
    shown = calls_as_text(conversation(json.dumps(ARGS)), HermesToolParser)
    assert "tool_calls" not in shown[2]
    assert shown[2]["content"] == HermesToolParser.render(conversation(ARGS)[2]["tool_calls"])
    assert shown[2]["content"].startswith("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\"")
    assert shown[:2] == conversation(ARGS)[:2] and shown[3:] == conversation(ARGS)[3:]
    rendered = ChatTemplate("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}\n{% endfor %}").render(shown)
    assert "assistant:<tool_call>" in rendered
