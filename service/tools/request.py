"""How a chat request's tools and tool_choice shape its prompt, its decoding and the parsing of its reply:
the route's few calls into tool calling."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.grammar import GrammarError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutput
from service.chat import ChatOptions
from service.choices import ChatChoiceBuilder
from service.errors import APIError
from service.protocol import ChatCompletionRequest, NamedToolChoice
from service.state import ServerState
from service.tools import tool_text_format
from service.tools.choice import ToolChatChoiceBuilder
from service.tools.forced import (
    NamedCallParser,
    RequiredCallsParser,
    named_call_schema,
    required_calls_schema,
)
from service.tools.parser import ToolParser


@dataclass(frozen=True)
class ToolPlan:
    """What one request's tools mean for it."""

    template_tools: list[dict[str, Any]] | None  # the chat template's `tools` variable
    text_format: type[ToolParser]  # how the model writes calls (and how past calls are shown to it)
    make_parser: Callable[[], ToolParser] | None  # parses the reply into calls; None: plain text
    structured_output: StructuredOutput | None  # required/named: the reply is constrained to the call(s)

    @property
    def forced(self) -> bool:
        return self.structured_output is not None

    @property
    def needs_special_tokens(self) -> bool:
        return self.make_parser is not None and not self.forced and self.text_format.needs_special_tokens


def plan_tools(body: ChatCompletionRequest, chat_template: str | None, parser_name: str | None) -> ToolPlan:
    """The plan for a request on a model with `chat_template`; `parser_name` is --tool-call-parser."""
    text_format = tool_text_format(chat_template, parser_name)
    tools = body.tools or []
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools] or None
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    functions = [tool.function for tool in tools]
    if isinstance(choice, NamedToolChoice):
        function = next(f for f in functions if f.name == choice.function.name)
        return ToolPlan(template_tools, text_format, lambda: NamedCallParser(function.name),
                        StructuredOutput("json", named_call_schema(function)))
    if choice == "required":
        return ToolPlan(template_tools, text_format, RequiredCallsParser,
                        StructuredOutput("json", required_calls_schema(functions, body.parallel_tool_calls)))
    if choice == "auto":
        return ToolPlan(template_tools, text_format, text_format, None)
    return ToolPlan(template_tools, text_format, None, None)


def chat_options(body: ChatCompletionRequest, plan: ToolPlan) -> ChatOptions:
    """How the request's conversation is rendered: its template fields, and the tools for the template."""
    return ChatOptions(add_generation_prompt=body.add_generation_prompt,
                       continue_final_message=body.continue_final_message,
                       template_kwargs=body.chat_template_kwargs, tools=plan.template_tools)


async def apply_tools(state: ServerState, plan: ToolPlan, params: list[SamplingParams]) -> list[SamplingParams]:
    """The request's sampling parameters with what its tools need: the constraint of a forced call
    (compiled here, off the event loop), and special tokens kept in the text when the tool-call markers
    are special tokens."""
    changes: dict[str, Any] = {}
    if plan.structured_output is not None:
        if any(p.structured_output is not None for p in params):
            raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                                "response_format or structured outputs", param="tool_choice")
        grammars = getattr(state.require_engine(), "grammars", None)
        if grammars is not None:  # None: a fake engine in unit tests
            try:
                await asyncio.to_thread(grammars.compile, plan.structured_output)
            except GrammarError as exc:
                raise APIError(400, f"tools: a parameters schema cannot be enforced: {exc}", param="tools") from exc
        changes["structured_output"] = plan.structured_output
    if plan.needs_special_tokens:
        changes["skip_special_tokens"] = False
    return [dataclasses.replace(p, **changes) for p in params] if changes else params


def chat_choice_builder(index: int, tokenizer: Any, logprobs: bool, plan: ToolPlan) -> ChatChoiceBuilder:
    """A plain choice builder, or one that parses tool calls out of the reply."""
    if plan.make_parser is None:
        return ChatChoiceBuilder(index, tokenizer, logprobs)
    return ToolChatChoiceBuilder(index, tokenizer, logprobs, plan.make_parser(), forced=plan.forced)
