"""Chat messages to prompt tokens through the model's (or --chat-template's) chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import APIError
from service.generation import Prompt, tokenize_prompt
from service.protocol import ChatMessage
from service.state import ServerState
from service.tools import tool_text_format
from service.tools.history import template_messages


@dataclass(frozen=True)
class ChatOptions:
    """How to render a conversation (vLLM's request fields, and the tools)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


def chat_prompt(state: ServerState, messages: list[ChatMessage], options: ChatOptions = ChatOptions()) -> Prompt:
    """Render request messages with the chat template and tokenize (the template adds the special tokens)."""
    tokenizer = state.require_engine().tokenizer
    if not getattr(tokenizer, "has_chat_template", True):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    text_format = tool_text_format(getattr(tokenizer, "chat_template", None), state.settings.tool_call_parser)
    shaped = template_messages(messages, getattr(tokenizer, "template", None), text_format)
    try:
        text = tokenizer.apply_chat_template(
            shaped, add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, tools=options.tools,
            template_kwargs=options.template_kwargs)
    except ValueError as exc:
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
    return tokenize_prompt(state, text, add_special_tokens=False)
