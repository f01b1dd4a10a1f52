"""The official `openai` client against a live kvserve: completions and chat, streamed and not."""

from __future__ import annotations

import math

import httpx
import pytest
from live_server import SERVED_NAME, LiveServer
from openai import OpenAI

PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Name a fruit."}]


def test_models_lists_the_served_model(client: OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]


def test_completion_greedy_stream_equals_non_stream(client: OpenAI) -> None:
    whole = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12


def test_completion_usage_is_exact(client: OpenAI, http: httpx.Client) -> None:
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    completion_ids = http.post("/tokenize", json={"prompt": PROMPT + out.choices[0].text}).json()["tokens"]
    assert out.usage.prompt_tokens == tokens["count"] > 0
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == tokens["count"] + 5
    # The generated text re-tokenizes to the prompt ids followed by (about) five more.
    assert completion_ids[: tokens["count"]] == tokens["tokens"]


def test_chat_greedy_stream_equals_non_stream(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=10, temperature=0)
    stream = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 10


def test_chat_stops_at_end_of_turn(client: OpenAI) -> None:
    out = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": "What is 2+2?"}],
                                         max_tokens=40, temperature=0)
    # SmolLM2 answers briefly and ends its turn with <|im_end|>, which is not shown.
    assert out.choices[0].finish_reason == "stop"
    assert "<|im_end|>" not in out.choices[0].message.content
    assert out.usage.completion_tokens < 40


def test_include_usage_adds_a_final_usage_chunk(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    content_chunks = [c for c in chunks[:-1] if c.choices and c.choices[0].delta.content]
    assert last.usage.completion_tokens >= len(content_chunks) > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_each_with_an_index(client: OpenAI) -> None:
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 3 * 6
    chunks = list(client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, n=2,
                                            seed=7, stream=True, extra_body={"ignore_eos": True}))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert set(texts) == {0, 1} and all(texts.values())
    # Same seed, same per-sample streams: the streamed samples equal the first two non-streamed ones.
    assert [texts[0], texts[1]] == [c.text for c in sorted(out.choices, key=lambda c: c.index)][:2]


def test_batched_prompts_get_choices_in_order(client: OpenAI) -> None:
    prompts = ["One, two,", "Red, green,"]
    batch = client.completions.create(model=SERVED_NAME, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    singles = [client.completions.create(model=SERVED_NAME, prompt=p, max_tokens=4, temperature=0).choices[0].text
               for p in prompts]
    by_index = {c.index: c.text for c in batch.choices}
    assert [by_index[0], by_index[2]] == singles  # greedy: batching does not change the answer
    assert by_index[0] == by_index[1]


def test_token_id_prompt_equals_text_prompt(client: OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_seed_reproducible_and_seeds_differ(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=SERVED_NAME, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.0, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_stop_string_ends_the_text(client: OpenAI) -> None:
    free = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text.strip().split()[1]  # a word that the greedy continuation does produce
    cut = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_completion_logprobs(client: OpenAI) -> None:
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0
        assert token in top and 3 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_returns_prompt_and_its_logprobs(client: OpenAI) -> None:
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                    logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    n_prompt = out.usage.prompt_tokens
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])


def test_max_tokens_zero_with_echo_scores_the_prompt(client: OpenAI) -> None:
    """Prompt scoring, as with vLLM: the prompt's logprobs, nothing generated; the same numbers as echo gives
    when it does generate."""
    scored = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    generated = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=1, temperature=0,
                                          echo=True, logprobs=1)
    choice, n_prompt = scored.choices[0], scored.usage.prompt_tokens
    assert choice.text == PROMPT and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == n_prompt and "".join(choice.logprobs.tokens) == PROMPT
    assert choice.logprobs.token_logprobs == generated.choices[0].logprobs.token_logprobs[:n_prompt]


def test_completion_without_max_tokens_stops_at_16(client: OpenAI) -> None:
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_chat_logprobs(client: OpenAI) -> None:
    out = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert bytes(entry.bytes).decode() == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-5)
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_vllm_extra_parameters_accepted(client: OpenAI) -> None:
    out = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0.8, seed=3,
                                    extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1,
                                                "min_tokens": 4, "ignore_eos": True})
    assert out.usage.completion_tokens == 4


def test_max_tokens_omitted_fills_the_context(http: httpx.Client) -> None:
    # The shared server has max_model_len 512; a 500-token prompt leaves room for at most 12 tokens.
    ids = http.post("/tokenize", json={"prompt": "hello " * 500}).json()["tokens"][:500]
    out = http.post("/v1/completions", json={"prompt": ids, "temperature": 0, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", ["/health", "/ready", "/version", "/metrics"])
def test_open_endpoints_need_no_key(server: LiveServer, path: str) -> None:
    assert httpx.get(server.base_url + path).status_code == 200


def test_tokenize_round_trip(http: httpx.Client) -> None:
    text = "Grüße, 世界! 👋"
    tokens = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == text
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert "<|im_start|>" in http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] or \
        chat["count"] > len(http.post("/tokenize", json={"prompt": CHAT[0]["content"]}).json()["tokens"])
