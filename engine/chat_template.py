"""Chat templates: Jinja rendering as transformers' apply_chat_template does it, with tools, template
kwargs and continue_final_message; the one place where multi-part message content becomes text."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})
PART_SEPARATOR = "\n"  # text parts of one message are joined with this (vLLM's "string" content format)


class ChatTemplate:
    """One compiled chat template."""

    def __init__(self, source: str) -> None:
        self.source = source
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"invalid chat template: {exc}") from exc

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the template reads assistant messages' tool_calls (else it would drop them)."""
        return "tool_calls" in self.source

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None,
               special_tokens: dict[str, str] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text of a conversation; ValueError on malformed messages or options."""
        checked = check_messages(messages)
        extra = dict(template_kwargs or {})
        clash = sorted(RESERVED_VARIABLES & extra.keys())
        if clash:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(clash)}")
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
            if checked[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the last message to be the assistant's")
        try:
            text = self._template.render(**extra, messages=checked, tools=tools,
                                         add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
        except (jinja2.TemplateError, TypeError) as exc:  # TypeError: e.g. a template adding None to text
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
        return _cut_after_final_message(text, checked[-1]) if continue_final_message else text


def load_chat_template(file_or_string: str) -> str:
    """The template text of a `--chat-template` value: a file's contents, or the value itself if it is a
    template. ValueError if it is neither or does not compile."""
    path = Path(file_or_string).expanduser()
    looks_like_template = any(mark in file_or_string for mark in ("{{", "{%"))
    if not looks_like_template:
        try:
            file_or_string = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"chat template {str(path)!r} is neither a readable file nor a Jinja template: "
                             f"{exc.strerror or exc}") from exc
    ChatTemplate(file_or_string)  # fail now, not on the first request
    return file_or_string


def content_text(content: Any, where: str = "content") -> str | None:
    """Message content as template text: a string, None, or a list of text parts joined by PART_SEPARATOR."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return PART_SEPARATOR.join(_text_part(part, where) for part in content)
    raise ValueError(f"{where} must be a string or a list of text parts")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages and shape them as templates expect: text content, tool call arguments as dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no 'role' (expected e.g. 'system', 'user', 'assistant')")
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
        content = content_text(message.get("content"), f"messages[{i}].content")
        if content is None and not message.get("tool_calls"):
            raise ValueError(f"messages[{i}] (role {role!r}) has null 'content'")
        shaped = {**message, "content": content}
        if message.get("tool_calls"):
            shaped["tool_calls"] = [_template_tool_call(call) for call in message["tool_calls"]]
        checked.append(shaped)
    return checked


def _template_tool_call(call: Any) -> Any:
    """OpenAI sends arguments as a JSON string; templates (as with transformers) expect a dict."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _cut_after_final_message(text: str, final: dict[str, Any]) -> str:
    """The rendered conversation up to the end of the final message's text, so generation continues it
    (what transformers does: the template's end-of-turn marker after it is dropped)."""
    content = (final.get("content") or "").strip()
    at = text.rfind(content) if content else -1
    if at < 0:
        raise ValueError("continue_final_message: the final message's text is not in the rendered template")
    return text[: at + len(content)]


def _text_part(part: Any, where: str) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"{where}: only parts of the form {{'type': 'text', 'text': ...}} are supported")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)
