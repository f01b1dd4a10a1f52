"""Speculative decoding (on by default): the openai client gets, streamed or not, the same greedy text as from a
server run with --speculative-config off, and /metrics counts the draft tokens checked and accepted under
kvserve's and vLLM's names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import API_KEY, LiveServer, start_server

# Text a small model copies back: the n-gram proposer finds what comes next in the prompt.
SOURCE = ("def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal + subtotal * tax\n\n"
          "def average(prices):\n    return sum(prices) / len(prices)\n")
MESSAGES = [{"role": "user", "content": f"Copy this Python code exactly:\n\n{SOURCE}"}]


def _start(*extra: str) -> LiveServer:
    return start_server("--api-key", API_KEY, "--max-model-len", "512", "--max-num-seqs", "8", *extra)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LiveServer, LiveServer]]:
    """A plain and a speculative server with --batch-invariant: a repeated request finds its prompt in the
    prefix cache, and only there is the prompt's attention the same bits as when it was computed cold."""
    plain = _start("--speculative-config", "off", "--batch-invariant")
    speculative = _start("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}', "--batch-invariant")
    yield plain, speculative
    for live in (plain, speculative):
        assert live.stop() == 0, live.log_text()[-4000:]


def test_greedy_chat_is_the_same_with_speculation_and_drafts_are_counted(servers) -> None:
    from openai import OpenAI

    options = dict(model="smollm2-test", messages=MESSAGES, max_tokens=80, temperature=0, logprobs=True)
    answers = []
    for live in servers:
        with OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
            reply = client.chat.completions.create(**options)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                **options, stream=True) if chunk.choices)
            answers.append((reply.choices[0].message.content, [t.logprob for t in reply.choices[0].logprobs.content],
                            reply.usage.completion_tokens, streamed))
    assert answers[0] == answers[1]
    assert answers[1][0] == answers[1][3]  # streamed text is the same text
    plain, speculative = servers
    assert plain.metric("kvserve_spec_decode_num_draft_tokens_total") == 0
    drafts = speculative.metric("kvserve_spec_decode_num_draft_tokens_total")
    accepted = speculative.metric("kvserve_spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafts
    assert speculative.metric("vllm:spec_decode_num_accepted_tokens_total") == accepted


def test_sampled_chat_speculates_unless_seeded(servers) -> None:
    from openai import OpenAI

    _, speculative = servers
    options = dict(model="smollm2-test", messages=MESSAGES, max_tokens=60, temperature=0.5)
    with OpenAI(base_url=f"{speculative.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as client:
        before = speculative.metric("kvserve_spec_decode_num_draft_tokens_total")
        seeded = [client.chat.completions.create(**options, seed=11).choices[0].message.content for _ in range(2)]
        assert seeded[0] == seeded[1]  # a seed still gives the same tokens: seeded requests do not speculate
        assert speculative.metric("kvserve_spec_decode_num_draft_tokens_total") == before
        accepted = speculative.metric("kvserve_spec_decode_num_accepted_tokens_total")
        reply = client.chat.completions.create(**options)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 60
    assert speculative.metric("kvserve_spec_decode_num_accepted_tokens_total") > accepted
