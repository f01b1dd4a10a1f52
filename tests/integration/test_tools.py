"""Tool calling on a live server with the real openai client: tool_choice auto (the model's own Hermes
calls, parsed), none, streamed calls reassembled by the client's stream helper, a conversation that goes
on with tool results, and the chat template request options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from live_server import REPO_ROOT, SERVED_NAME, LiveServer, start_server
from pydantic import BaseModel, ConfigDict, Field

pytestmark = pytest.mark.slow

TOOLS_TEMPLATE = REPO_ROOT / "service" / "chat_templates" / "chatml_tools.jinja"
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                 "parameters": WEATHER_PARAMETERS}}


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str


def asked_for_weather(*cities: str, then: str = "Berlin") -> list[dict]:
    """Earlier turns where the assistant answered weather questions with a call: SmolLM2-135M, greedy,
    follows the pattern and calls the tool for the last question too. (With tool results in these turns
    it imitates a <tool_response> instead: a 135M model copies the last pattern it saw.)"""
    messages: list[dict] = []
    for i, city in enumerate(cities):
        messages += [{"role": "user", "content": f"What is the weather in {city}?"},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": f"call_{i}", "type": "function",
                          "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}]
    return messages + [{"role": "user", "content": f"What is the weather in {then}?"}]


@pytest.fixture(scope="module")
def tools_server() -> Iterator[LiveServer]:
    """A server whose chat template shows the model its tools (--chat-template)."""
    live = start_server("--chat-template", str(TOOLS_TEMPLATE), "--max-model-len", "2048", "--max-num-seqs", "4")
    yield live
    assert live.stop() == 0, live.log_text()[-4000:]


@pytest.fixture(scope="module")
def tools_client(tools_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tools_server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as client:
        yield client


def test_auto_returns_the_models_call_as_tool_calls(tools_client: openai.OpenAI) -> None:
    response = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=asked_for_weather("Paris", "Rome"), tools=[WEATHER_TOOL], temperature=0,
        max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert arguments == {"city": "Berlin"}


def test_tool_choice_none_leaves_the_text_alone(tools_client: openai.OpenAI) -> None:
    response = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=asked_for_weather("Paris", "Rome"), tools=[WEATHER_TOOL], tool_choice="none",
        temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert "<tool_call>" in choice.message.content  # the same greedy reply as above, unparsed


def test_streamed_call_is_reassembled_by_the_client_stream_helper(tools_client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    argument_pieces = []
    with tools_client.chat.completions.stream(
            model=SERVED_NAME, messages=asked_for_weather("Paris", "Rome", then="Madrid"), tools=[tool],
            temperature=0, max_tokens=60) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                argument_pieces.append(event.arguments_delta)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert call.function.parsed_arguments == GetWeather(city="Madrid")
    assert len(argument_pieces) > 1 and "".join(argument_pieces) == call.function.arguments


def test_stream_chunks_are_shaped_as_openai_sends_them(tools_server: LiveServer) -> None:
    body = {"model": SERVED_NAME, "messages": asked_for_weather("Paris", "Rome"), "tools": [WEATHER_TOOL],
            "temperature": 0, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{tools_server.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    pieces = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
    first, rest = pieces[0], pieces[1:]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_weather"
    assert rest and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in rest)
    assert json.loads("".join(p["function"].get("arguments", "") for p in pieces)) == {"city": "Berlin"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_conversation_goes_on_with_tool_results(tools_server: LiveServer, tools_client: openai.OpenAI) -> None:
    messages = asked_for_weather("Paris", "Rome")
    response = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60)
    call = response.choices[0].message.tool_calls[0]
    messages += [response.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
    answer = tools_client.chat.completions.create(model=SERVED_NAME, messages=messages, tools=[WEATHER_TOOL],
                                                  temperature=0, max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The template saw the call (arguments as an object, not a JSON string) and the result.
    tokens = httpx.post(f"{tools_server.base_url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    text = httpx.post(f"{tools_server.base_url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>' in text
    assert text.endswith('<tool_response>\n{"temp_c": 21}\n</tool_response>\nassistant\n')


def test_continue_final_message_continues_the_assistant_text(tools_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    closed = tools_client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1,
                                                  extra_body={"add_generation_prompt": False})
    continued = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    # The continued prompt stops right after the text: without "<|im_end|>" and "\n".
    assert continued.usage.prompt_tokens == closed.usage.prompt_tokens - 2


@pytest.mark.parametrize(("extra", "message"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "unique"),
    ({"tools": None, "tool_choice": "required"}, "needs tools"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"continue_final_message": True}, "cannot both be true"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
      "tool_choice": "required"}, "tools: a parameters schema cannot be enforced"),
])
def test_bad_tool_and_template_options_get_400(tools_client: openai.OpenAI, extra: dict, message: str) -> None:
    body = {"tools": [WEATHER_TOOL], **extra}
    body = {key: value for key, value in body.items() if value is not None}
    with pytest.raises(openai.BadRequestError) as error:
        tools_client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, extra_body=body)
    assert message in error.value.body["message"]


# ---- forced calls: tool_choice "required" or a named function constrains the reply to valid calls ----

BOOKING_PARAMETERS = {
    "type": "object",
    "properties": {
        "guest": {"type": "object", "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 18, "maximum": 99}},
            "required": ["name", "age"], "additionalProperties": False},
        "nights": {"type": "integer", "minimum": 1, "maximum": 14},
        "room": {"enum": ["single", "double", "suite"]},
        "extras": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,10}$"},
                   "minItems": 1, "maxItems": 3},
        "budget": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1000}, {"type": "null"}]},
    },
    "required": ["guest", "nights", "room", "extras", "budget"],
    "additionalProperties": False,
}
BOOKING_TOOL = {"type": "function", "function": {"name": "book_room", "description": "Book a hotel room",
                                                 "parameters": BOOKING_PARAMETERS}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "book_room": BOOKING_PARAMETERS}
BOOK = [{"role": "user", "content": "Book a double room for Ann, 34, for three nights with breakfast."}]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 2}])
def test_named_function_arguments_match_its_schema(tools_client: openai.OpenAI, sampling: dict) -> None:
    response = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=BOOK, tools=[WEATHER_TOOL, BOOKING_TOOL], max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "book_room"}}, **sampling)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == "book_room" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), BOOKING_PARAMETERS)


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_match_their_functions_schemas(tools_client: openai.OpenAI, parallel: bool) -> None:
    response = tools_client.chat.completions.create(
        model=SERVED_NAME, messages=BOOK, tools=[WEATHER_TOOL, BOOKING_TOOL], tool_choice="required",
        parallel_tool_calls=parallel, temperature=0, max_tokens=300)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    assert len({call.id for call in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


class Guest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # closed objects and bounded strings keep replies short

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)


class BookRoom(BaseModel):
    """Book a hotel room."""

    model_config = ConfigDict(extra="forbid")

    guest: Guest
    nights: int = Field(ge=1, le=14)
    room: Literal["single", "double", "suite"]


def test_streamed_named_call_parses_into_the_pydantic_model(tools_client: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(BookRoom, name="book_room")
    with tools_client.chat.completions.stream(
            model=SERVED_NAME, messages=BOOK, tools=[tool], temperature=0, max_tokens=200,
            tool_choice={"type": "function", "function": {"name": "book_room"}}) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert isinstance(call.function.parsed_arguments, BookRoom)


def test_langchain_bind_tools_and_structured_output(tools_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=SERVED_NAME, base_url=f"{tools_server.base_url}/v1", api_key="unused",
                       temperature=0, max_tokens=120, max_retries=0, timeout=300)
    reply = model.bind_tools([BookRoom, GetWeather], tool_choice="BookRoom").invoke(BOOK[0]["content"])
    [call] = reply.tool_calls
    assert call["name"] == "BookRoom" and call["id"].startswith("call_")
    BookRoom.model_validate(call["args"])
    booking = model.with_structured_output(BookRoom, method="function_calling").invoke(BOOK[0]["content"])
    assert isinstance(booking, BookRoom)


def test_conversation_on_a_template_without_tool_support(client: openai.OpenAI, http: httpx.Client) -> None:
    """SmolLM2's own template ignores tool_calls: past calls reach the model as Hermes text instead."""
    question = {"role": "user", "content": "Weather in Paris?"}
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=[question], tools=[WEATHER_TOOL], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    messages = [question, reply.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'}]
    answer = client.chat.completions.create(model=SERVED_NAME, messages=messages, tools=[WEATHER_TOOL],
                                            max_tokens=20, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    text = http.post("/detokenize", json={"tokens": http.post("/tokenize", json={"messages": messages}).json()[
        "tokens"]}).json()["prompt"]
    shown = json.dumps({"name": "get_weather", "arguments": json.loads(call.function.arguments)}, ensure_ascii=False)
    # (detokenize drops the special tokens <|im_start|> and <|im_end|>)
    assert text.endswith(f'user\nWeather in Paris?\nassistant\n<tool_call>\n{shown}\n</tool_call>\n'
                         'tool\n{"temp_c": 18}\nassistant\n')
