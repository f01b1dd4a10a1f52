"""/v1/embeddings on a live server with the `openai` client: a tiny random model with mean pooling (from its
sentence-transformers config), checked against transformers' hidden states; bad input gets 400."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers.tiny_engine import add_sentence_transformers_pooling, make_tiny_model_dir
from live_server import API_KEY, SERVED_NAME, LiveServer, start_server
from transformers import AutoModelForCausalLM

from engine.tokenizer import Tokenizer

MAX_LEN = 64
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Bonjour le monde."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("embed")
    make_tiny_model_dir(path)
    return add_sentence_transformers_pooling(path, "mean_tokens")


@pytest.fixture(scope="module")
def live(model_dir: str) -> Iterator[LiveServer]:
    server = start_server("--model", model_dir, "--api-key", API_KEY, "--quantization", "none", "--dtype",
                          "float32", "--max-model-len", str(MAX_LEN), "--max-num-batched-tokens", "16", "--max-num-seqs", "8")
    yield server
    assert server.stop() == 0, server.log_text()[-4000:]


@pytest.fixture(scope="module")
def client(live: LiveServer):
    from openai import OpenAI

    with OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as openai_client:
        yield openai_client


def expected(model_dir: str, ids: list[int], dimensions: int | None = None) -> torch.Tensor:
    """Mean of transformers' final hidden states, cut to `dimensions`, L2-normalized."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        pooled = model.model(torch.tensor([ids])).last_hidden_state[0].mean(0)
    return torch.nn.functional.normalize(pooled[:dimensions], dim=0)


def decode_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# The client asks for base64 itself when encoding_format is omitted, and decodes it; asked for
# explicitly, base64 comes back as the string.
@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_openai_client_matches_transformers(client, model_dir: str, live: LiveServer,
                                            encoding_format: str | None) -> None:
    tokenizer = Tokenizer.load(model_dir)
    requests_before = live.metric("kvserve_requests_total", endpoint="/v1/embeddings")
    prompt_tokens_before = live.metric("kvserve_prompt_tokens_total")
    options = {"encoding_format": encoding_format} if encoding_format else {}
    reply = client.embeddings.create(model=SERVED_NAME, input=TEXTS, **options)
    ids = [tokenizer.encode(t) for t in TEXTS]
    assert [d.index for d in reply.data] == [0, 1]
    for data, prompt_ids in zip(reply.data, ids, strict=True):
        vector = decode_base64(data.embedding) if encoding_format == "base64" else data.embedding
        torch.testing.assert_close(torch.tensor(vector), expected(model_dir, prompt_ids), rtol=1e-4, atol=1e-4)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(len(i) for i in ids)
    assert reply.model == SERVED_NAME
    assert live.metric("kvserve_requests_total", endpoint="/v1/embeddings") == requests_before + 1
    assert live.metric("kvserve_prompt_tokens_total") == prompt_tokens_before + sum(len(i) for i in ids)
    assert live.metric("kvserve_kv_cache_usage_ratio") == 0.0


def test_base64_is_little_endian_float32(live: LiveServer) -> None:
    with httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        as_floats = http.post("/v1/embeddings", json={"input": "Hello", "encoding_format": "float"}).json()
        as_b64 = http.post("/v1/embeddings", json={"input": "Hello", "encoding_format": "base64"}).json()
    decoded = decode_base64(as_b64["data"][0]["embedding"])
    assert len(decoded) == 64
    assert decoded == pytest.approx(as_floats["data"][0]["embedding"], abs=1e-7)


def test_token_ids_and_dimensions(client, model_dir: str) -> None:
    ids = Tokenizer.load(model_dir).encode(TEXTS[0])
    one = client.embeddings.create(model=SERVED_NAME, input=ids, dimensions=16, encoding_format="float")
    (data,) = one.data
    assert len(data.embedding) == 16
    torch.testing.assert_close(torch.tensor(data.embedding), expected(model_dir, ids, 16), rtol=1e-4, atol=1e-4)
    several = client.embeddings.create(model=SERVED_NAME, input=[ids, ids[:5]], encoding_format="float")
    assert [len(d.embedding) for d in several.data] == [64, 64]
    torch.testing.assert_close(torch.tensor(several.data[1].embedding), expected(model_dir, ids[:5]),
                               rtol=1e-4, atol=1e-4)


def test_embeddings_share_the_batch_with_completions(client, live: LiveServer) -> None:
    """Completions stream while embeddings run; both answer, and every KV block comes back."""
    def complete() -> str:
        return client.completions.create(model=SERVED_NAME, prompt=TEXTS[0], max_tokens=20, temperature=0).choices[0].text

    def embed(i: int) -> list[float]:
        return client.embeddings.create(model=SERVED_NAME, input=TEXTS[i % 2], encoding_format="float").data[0].embedding

    alone = embed(0)
    with ThreadPoolExecutor(6) as pool:
        completion = pool.submit(complete)
        vectors = list(pool.map(embed, range(8)))
    assert completion.result() == complete()  # greedy output does not depend on the batch
    torch.testing.assert_close(torch.tensor(vectors[0]), torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert live.metric("kvserve_kv_cache_usage_ratio") == 0.0


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"input": ""}, "input", "input[0] is empty"),
    ({"input": []}, "input", "input is empty"),
    ({"input": "word " * 80}, "input", "maximum context length is 64 tokens"),
    ({"input": [[1, 2], []]}, "input", "input[1] is empty"),
    ({"input": [5, 100000]}, "input", "out of range"),
    ({"input": "Hello", "dimensions": 65}, "dimensions", "dimensions=65 is larger than this model's embedding size 64"),
    ({"input": "Hello", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
    ({"input": "Hello", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": ["a", 3]}, "input", ""),
])
def test_bad_input_is_400(live: LiveServer, body: dict, param: str, needle: str) -> None:
    with httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        reply = http.post("/v1/embeddings", json={"model": SERVED_NAME, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert live.metric("kvserve_kv_cache_usage_ratio") == 0.0
