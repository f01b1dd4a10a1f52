"""Request models: bounds, cross-field rules, and the SamplingParams they turn into."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from engine.chat_template import content_text
from service.protocol import ChatCompletionRequest, ChatDelta, CompletionRequest, TokenizeRequest


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "hi", **fields})


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt: object, expected: list) -> None:
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("fields", [
    {"temperature": -0.1}, {"temperature": 2.5}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"n": 17},
    {"max_tokens": -1}, {"presence_penalty": -3}, {"frequency_penalty": 2.1}, {"logprobs": 21}, {"seed": -1},
    {"top_k": -2}, {"min_p": 1.5}, {"repetition_penalty": 0}, {"min_tokens": -1},
    {"stop": ""}, {"stop": [""]}, {"stop": ["x"] * 17}, {"logit_bias": {"a": 1.0}}, {"logit_bias": {"5": 101}},
    {"prompt": []}, {"prompt": [-1]}, {"prompt": [[]]}, {"prompt": 3},
    {"max_tokens": "4"}, {"n": 1.0}, {"n": True}, {"echo": "yes"},
    {"suffix": "x"}, {"best_of": 3}, {"stream_options": {"include_usage": "yes"}, "stream": True},
    {"stream_options": {"include_usage": True}},  # without stream
    {"min_tokens": 5, "max_tokens": 4},
])
def test_completion_rejects(fields: dict) -> None:
    with pytest.raises(ValidationError):
        completion(**fields)


def test_completion_to_sampling_params() -> None:
    request = completion(n=2, temperature=0.5, top_p=0.9, stop="END", seed=3, logit_bias={"7": -5.0},
                         logprobs=2, echo=True, top_k=10, min_p=0.1, repetition_penalty=1.2, min_tokens=1,
                         ignore_eos=True, presence_penalty=0.5, frequency_penalty=-0.5)
    params = request.to_sampling_params(max_tokens=9)
    assert (params.n, params.max_tokens, params.temperature, params.top_p) == (2, 9, 0.5, 0.9)
    assert params.stop == ["END"] and params.seed == 3 and params.logit_bias == {7: -5.0}
    assert params.logprobs == 2 and params.prompt_logprobs == 2
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (10, 0.1, 1.2, 1)
    assert params.ignore_eos and (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    # Without echo, no prompt logprobs are computed.
    assert completion(logprobs=1).to_sampling_params(4).prompt_logprobs is None


def test_chat_rules_and_params() -> None:
    messages = [{"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": "hi"}]
    request = ChatCompletionRequest.model_validate({"messages": messages, "max_completion_tokens": 7,
                                                    "logprobs": True, "top_logprobs": 3})
    assert request.requested_max_tokens == 7
    # Parts go to the template renderer as parts: engine.chat_template.content_text is the one place they
    # become text, for the API and for engine users alike.
    shaped = request.messages[0].as_template_dict()
    assert shaped["role"] == "system" and content_text(shaped["content"]) == "be \nbrief"
    params = request.to_sampling_params(7)
    assert params.logprobs == 3 and params.max_tokens == 7
    assert ChatCompletionRequest.model_validate({"messages": messages}).to_sampling_params(5).logprobs is None
    for bad in ({"top_logprobs": 2}, {"max_tokens": 2, "max_completion_tokens": 3}, {"messages": []},
                {"response_format": {"type": "xml"}}, {"response_format": {"type": "json_schema",
                                                                          "json_schema": {"schema": {}}}},
                {"tools": []}, {"tool_choice": "required"}, {"tools": [{"function": {"name": "a b"}}]},
                {"tools": [{"function": {"name": "f"}}], "tool_choice": {"function": {"name": "g"}}}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": messages, **bad})


def test_tokenize_needs_exactly_one_input() -> None:
    assert TokenizeRequest.model_validate({"prompt": "x"}).prompt == "x"
    for bad in ({}, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}):
        with pytest.raises(ValidationError):
            TokenizeRequest.model_validate(bad)


def test_chat_delta_carries_only_what_changed() -> None:
    assert ChatDelta(content="x").model_dump() == {"content": "x"}
    assert ChatDelta().model_dump() == {}
    assert ChatDelta(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("body", [
    '{"prompt": "a\\ud800"}', '{"prompt": ["ok", "\\udc00"]}', '{"prompt": "x", "stop": "\\ud800"}',
    '{"prompt": "x", "stop": ["a", "\\ud800"]}', '{"prompt": "x", "user": "\\udfff"}',
    '{"prompt": "x", "logit_bias": {"\\ud800": 1}}',
])
def test_completion_rejects_lone_surrogates(body: str) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(json.loads(body))


@pytest.mark.parametrize("message", [
    '{"role": "user", "content": "\\ud800"}', '{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}',
    '{"role": "user", "content": "hi", "name": "\\ud800"}',
    '{"role": "user"}', '{"role": "user", "content": null}', '{"role": "system", "content": null}',
    '{"role": "developer"}', '{"role": "tool", "content": null}',
])
def test_chat_rejects_bad_messages(message: str) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(json.loads(f'{{"messages": [{message}]}}'))


def test_valid_text_and_pairs_pass() -> None:
    request = ChatCompletionRequest.model_validate(json.loads(
        '{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00 caf\\u00e9"},'
        ' {"role": "assistant", "content": null}]}'))
    assert request.messages[0].content == "smile \U0001F600 café"
    assert completion(prompt=list(range(100_000))).prompts()[0][-1] == 99_999


def test_unknown_fields_are_ignored_known_ones_still_checked(caplog: pytest.LogCaptureFixture) -> None:
    """As OpenAI and vLLM: clients send fields of their own (the openai client, LangChain), at any depth."""
    extras = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": False,
              "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with caplog.at_level("DEBUG", logger="kvserve.service"):
        request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x", "x": 1}],
                                                        **extras})
    assert request.include_usage and not hasattr(request, "store")
    assert any("store" in str(getattr(r, "fields", "")) for r in caplog.records)
    assert completion(frobnicate=True).prompts() == ["hi"]
    assert TokenizeRequest.model_validate({"prompt": "x", "return_token_strs": True}).prompt == "x"
    with pytest.raises(ValidationError, match="temperature"):
        completion(temperature="hot", frobnicate=True)
