"""Past tool calls in the conversation, for chat templates that do not read `tool_calls`."""

from __future__ import annotations

from typing import Any

from service.tools.parser import ToolParser


def template_messages(messages: list[Any], template: Any, text_format: type[ToolParser]) -> list[dict[str, Any]]:
    """Request messages (protocol ChatMessage) as the chat template gets them."""
    shaped = [message.as_template_dict() for message in messages]
    if template is not None and not template.renders_tool_calls:
        shaped = calls_as_text(shaped, text_format)
    return shaped


def calls_as_text(messages: list[dict[str, Any]], text_format: type[ToolParser]) -> list[dict[str, Any]]:
    """For templates that do not read tool_calls: past assistant calls written into the content, in the
    format the model is expected to use, so the model still sees what it called."""
    shown = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            before = message.get("content")
            text = text_format.render(calls)
            message = {key: value for key, value in message.items() if key != "tool_calls"}
            message["content"] = f"{before}\n{text}" if isinstance(before, str) and before else text
        shown.append(message)
    return shown
