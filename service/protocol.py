"""OpenAI-compatible request and response models; requests turn into SamplingParams here."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from engine.sampling_params import SamplingParams
from service.unicode_text import reject_lone_surrogates

MAX_N = 16  # samples per prompt; bounds the work one request can ask for
MAX_PROMPTS = 64  # prompts in one batched completions request
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
MAX_TOOLS = 128

TokenId = Annotated[int, Field(ge=0)]

log = logging.getLogger("kvserve.service")


class StrictModel(BaseModel):
    """Requests reject wrong JSON types (no "5" for 5) with a 400. Unknown fields are ignored, as OpenAI and
    vLLM do: clients send fields of their own (`store`, `metadata`, `service_tier`...)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and log.isEnabledFor(logging.DEBUG):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            if unknown := sorted(str(k) for k in data if k not in known):
                log.debug("ignoring unknown request fields", extra={"fields": {"model": cls.__name__,
                                                                               "ignored": unknown}})
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return reject_lone_surrogates(value)  # every text field: a lone surrogate is a 400, not a 500 later


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's response_format; service/structured.py turns it into a grammar."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(StrictModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="EBNF: GBNF (llama.cpp) or Lark")
    json_object: bool | None = None


class StructuredOutputFields(StrictModel):
    """Constrained decoding, on chat and completions: OpenAI's response_format, vLLM's structured_outputs
    and its older guided_* fields (service/structured.py checks them and builds the grammar)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None


class SamplingRequest(StructuredOutputFields):
    """Fields shared by completions and chat (OpenAI's, plus vLLM's extras)."""

    model: str | None = Field(None, description="served model name; omitted means the one served model")
    max_tokens: int | None = Field(None, ge=0, description="default: 16 for completions, the rest of the context for "
                                   "chat, both capped by --max-tokens-default; 0 only for completions with echo")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="after")
    def _check_common(self) -> SamplingRequest:
        if self.stop == "":
            raise ValueError("stop must not be an empty string")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({max_tokens})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        return dict(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()}, seed=self.seed,
            stop=self.stop_list, stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
        )


Prompt = (
    Annotated[str, Field(description="one prompt")]
    | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: None = Field(None, description="not supported; must be null")

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo: the prompt (and its logprobs) back, nothing generated, as vLLM does."""
        return self.max_tokens == 0 and self.echo

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine parameters; `max_tokens` is already resolved against the context length."""
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        # The engine always samples; for max_tokens 0 it samples one token that the response leaves out.
        return SamplingParams(**self._sampling_kwargs(max(max_tokens, 1)), logprobs=self.logprobs,
                              prompt_logprobs=prompt_logprobs)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCall(StrictModel):
    """A tool call: in an assistant message of the conversation, and in responses."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        # Only an assistant turn may come without text; an empty user turn would have the model
        # answer nothing in particular until the context is full.
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in a {self.role} message")
        return self

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates get it (text parts are joined by engine.chat_template)."""
        message = self.model_dump(exclude_none=True)
        message["content"] = message.get("content")
        # Chat templates know "system", not OpenAI's newer "developer" role.
        message["role"] = "system" if self.role == "developer" else self.role
        return message


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # 0 gets a clear 400 from the route
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's chat template options
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        check_tools(self.tools, self.tool_choice)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """Engine parameters; `max_tokens` is already resolved against the context length."""
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(**self._sampling_kwargs(max_tokens), logprobs=logprobs)


def check_tools(tools: list[ChatTool] | None, tool_choice: str | NamedToolChoice | None) -> None:
    """Cross-field rules of tools and tool_choice, as OpenAI states them."""
    names = [tool.function.name for tool in tools or []]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"tools: function names must be unique; repeated: {', '.join(duplicated)}")
    if isinstance(tool_choice, NamedToolChoice):
        if tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {tool_choice.function.name!r}, which is not in tools")
    elif tool_choice in ("auto", "required") and not names:
        raise ValueError(f"tool_choice {tool_choice!r} needs tools")


# ---- responses ----

class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


def _created() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # content stays (null when the reply is only tool calls); tool_calls only when there are some.
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaModel(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A delta carries only what changed: {"content": "x"}, and {} in the final chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(DeltaModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(DeltaModel):
    """A piece of a streamed tool call: id, type and name in its first piece, arguments in pieces."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class ChatDelta(DeltaModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_created)
    owned_by: str = "kvserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(StrictModel):
    """POST /tokenize: give `prompt` (text) or `messages` (the chat template is applied)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeRequest(StrictModel):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class StatusResponse(BaseModel):
    status: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
