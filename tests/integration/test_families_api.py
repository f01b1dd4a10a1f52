"""`kvserve serve --model DIR` of each tiny family checkpoint: /v1/attention and completions match transformers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from helpers.tiny_engine import _tokenizer
from helpers.tiny_families import tiny_gemma2, tiny_gemma3, tiny_mistral, tiny_phi3, tiny_qwen3
from helpers.tiny_models import save_hf
from live_server import LiveServer, start_server

PROMPT = torch.randint(3, 320, (36,), generator=torch.Generator().manual_seed(5)).tolist()
BUILDERS = {"qwen3": tiny_qwen3, "mistral": tiny_mistral, "gemma2": tiny_gemma2, "gemma3": tiny_gemma3,
            "phi3": tiny_phi3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    hf = BUILDERS[request.param]()
    hf.set_attn_implementation("eager")
    path = tmp_path_factory.mktemp(request.param)
    save_hf(hf, path)
    _tokenizer().save(str(path / "tokenizer.json"))
    live: LiveServer = start_server("--quantization", "none", "--max-model-len", "128", model=Path(path))
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        yield hf, http
    assert live.stop() == 0, live.log_text()[-4000:]


def test_attention_endpoint_matches_eager_transformers(served) -> None:
    hf, http = served
    response = http.post("/v1/attention", json={"prompt": PROMPT, "precision": 6, "top_k": 0})
    assert response.status_code == 200, response.text
    got = torch.tensor(response.json()["attention"], dtype=torch.float64)  # [layer][head][query][key]
    with torch.no_grad():
        expected = torch.stack([a[0] for a in hf(torch.tensor([PROMPT]), output_attentions=True).attentions])
    torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-4)


def test_greedy_continuation_matches_transformers(served) -> None:
    """Inspection's greedy tokens are transformers' ids; serving's completion is the same text."""
    hf, http = served
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          eos_token_id=None, pad_token_id=0)
    inspected = http.post("/v1/attention", json={"prompt": PROMPT, "max_tokens": 10, "layers": "last", "heads": 0,
                                                 "query_positions": "last", "top_k": 0}).json()
    generated = inspected["tokens"][inspected["num_prompt_tokens"]:]
    assert [t["id"] for t in generated] == out[0, len(PROMPT):].tolist()
    served_text = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                                     "ignore_eos": True}).json()["choices"][0]["text"]
    assert served_text == "".join(t["text"] for t in generated)
