"""--speculative-config: the openai client gets, streamed or not, the same greedy text as from a server without it,
and /metrics counts the draft tokens checked and accepted under kvserve's and vLLM's names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import API_KEY, LiveServer, start_server

# Text a small model copies back: the n-gram proposer finds what comes next in the prompt.
SOURCE = ("def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal + subtotal * tax\n\n"
          "def average(prices):\n    return sum(prices) / len(prices)\n")
MESSAGES = [{"role": "user", "content": f"Copy this Python code exactly:\n\n{SOURCE}"}]


@pytest.fixture(scope="module")
def speculative() -> Iterator[LiveServer]:
    live = start_server("--api-key", API_KEY, "--max-model-len", "512", "--max-num-seqs", "8",
                        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    yield live
    assert live.stop() == 0, live.log_text()[-4000:]


def test_greedy_chat_is_the_same_with_speculation_and_drafts_are_counted(speculative: LiveServer, client) -> None:
    from openai import OpenAI

    options = dict(model="smollm2-test", messages=MESSAGES, max_tokens=80, temperature=0, logprobs=True)
    plain = client.chat.completions.create(**options)
    with OpenAI(base_url=f"{speculative.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as spec_client:
        guessed = spec_client.chat.completions.create(**options)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in spec_client.chat.completions.create(
            **options, stream=True) if chunk.choices)
    assert guessed.choices[0].message.content == plain.choices[0].message.content == streamed
    assert [t.logprob for t in guessed.choices[0].logprobs.content] == \
        [t.logprob for t in plain.choices[0].logprobs.content]
    assert guessed.usage.completion_tokens == plain.usage.completion_tokens
    drafts = speculative.metric("kvserve_spec_decode_num_draft_tokens_total")
    accepted = speculative.metric("kvserve_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafts
    assert speculative.metric("vllm:spec_decode_num_accepted_tokens_total") == accepted
