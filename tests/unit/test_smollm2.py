"""The real SmolLM2-135M GGUF against transformers loading the same file: logits and greedy continuations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.cpu_formats import build_or_expect_refusal, refusal

from engine import LLM, SamplingParams
from engine.runner import ModelRunner
from engine.weights import load_model

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three prime numbers and explain why 1 is not prime."}],
]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf_path: Path) -> torch.nn.Module:
    """transformers dequantizing the same GGUF to fp32 (slow: about a minute here, so once per module)."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def llm(smollm2_gguf_path: Path) -> LLM:
    # A small KV cache: the default takes a fraction of free memory, which costs time to allocate here.
    # quantization="none": exact fp32 weights, the ones transformers computes with.
    return LLM(str(smollm2_gguf_path), device="cpu", dtype="float32", quantization="none",
               kv_cache_bytes=64 << 20, max_model_len=512)


@pytest.fixture(scope="module")
def chat_prompts(llm: LLM) -> list[list[int]]:
    """The chat prompts as token ids, so both sides see the same input whatever their tokenizers do."""
    return [llm.chat_prompt(chat) for chat in CHATS]


def test_logits_match_transformers(smollm2_gguf_path: Path, hf_model: torch.nn.Module,
                                   chat_prompts: list[list[int]]) -> None:
    ids = chat_prompts[0]
    model, cfg = load_model(str(smollm2_gguf_path), "cpu", torch.float32, max_positions=256, progress=False)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 9, 3, True)
    runner = ModelRunner.for_testing(model, cfg, block_size=16, num_blocks=8)
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(runner.logits_for(ids), expected, rtol=1e-3, atol=1e-3)
    # Prefill half, then decode through the cache: the cached path must agree as well.
    cached = runner.logits_for(ids, chunk_size=len(ids) // 2)
    torch.testing.assert_close(cached, expected, rtol=1e-3, atol=1e-3)


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    # transformers appends the EOS it stopped on; kvserve may or may not report it: compare without it.
    return ids[:-1] if ids and ids[-1] in eos else ids


def test_greedy_continuations_match_transformers(llm: LLM, hf_model: torch.nn.Module,
                                                 chat_prompts: list[list[int]]) -> None:
    # All prompts go in one generate call: kvserve batches them, and greedy output must not depend on that.
    outputs = llm.generate(chat_prompts, SamplingParams(max_tokens=32, temperature=0.0))
    eos = set(llm.tokenizer.eos_token_ids)
    for ids, output in zip(chat_prompts, outputs, strict=True):
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                          eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
        expected = generated[0, len(ids):].tolist()
        got = list(output.outputs[0].token_ids)
        assert _strip_eos(got, eos) == _strip_eos(expected, eos), llm.tokenizer.decode(expected)
        assert output.outputs[0].finish_reason == ("length" if len(expected) == 32 and expected[-1] not in eos
                                                   else "stop")


# A passage the model has not been tuned on, long enough that the averages below are stable.
PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of oil and a cloth. "
    "He cleaned the great lens until it shone, trimmed the wick, and lit the lamp. Ships passing the rocky "
    "headland relied on its beam to find the channel into the harbour. In winter the storms were fierce, and "
    "waves broke over the gallery rail, but the light never went out. When electricity finally reached the "
    "island, an automatic lamp replaced him, and the keeper moved to a cottage in the village, where he "
    "taught the children how to read the weather from the shape of the clouds and the colour of the sea."
)


@pytest.mark.parametrize(("dtype", "quantization", "max_kl", "min_top1", "max_ppl_ratio"),
                         [("float32", "bf16", 0.005, 0.95, 1.01), ("float32", "fp16", 1e-3, 0.99, 1.005),
                          ("float32", "int8", 0.15, 0.75, 1.15), ("float32", "int4", 0.15, 0.75, 1.15),
                          ("float32", "auto", 0.002, 0.95, 1.01), ("bfloat16", "auto", 0.005, 0.92, 1.01),
                          ("float32", "int4-a8", 0.03, 0.9, 1.03)])
def test_faster_formats_stay_close_to_fp32(smollm2_gguf_path: Path, llm: LLM, dtype: str, quantization: str,
                                           max_kl: float, min_top1: float, max_ppl_ratio: float) -> None:
    """The documented cost of each faster weight format (and of a bf16 model), measured on a passage
    (figures in the README)."""
    quantized = build_or_expect_refusal(
        lambda: LLM(str(smollm2_gguf_path), device="cpu", dtype=dtype, quantization=quantization,
                    kv_cache_bytes=16 << 20, max_model_len=512), dtype, quantization)
    ids = llm.engine.tokenizer.encode(PASSAGE)
    exact = llm.engine.runner.logits_for(ids).log_softmax(-1)
    approx = quantized.engine.runner.logits_for(ids).float().log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1).mean().item()
    top1 = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    targets = torch.tensor(ids[1:])[:, None]
    nll_exact = -exact[:-1].gather(1, targets).mean().item()
    nll_approx = -approx[:-1].gather(1, targets).mean().item()
    ppl_ratio = float(torch.tensor(nll_approx - nll_exact).exp())
    print(f"{dtype}/{quantization}: KL {kl:.5f}, top-1 agreement {top1:.3f}, perplexity ratio {ppl_ratio:.4f}")
    assert kl < max_kl and top1 > min_top1 and ppl_ratio < max_ppl_ratio
    assert kl > 0  # the format really is in use: its logits are not fp32's


@pytest.mark.parametrize("options", [{}, {"attention_backend": "sdpa", "batch_invariant": True},
                                     {"quantization": "int4-a8"}],
                         ids=["default-paged-kernel", "sdpa-batch-invariant", "int4-a8"])
def test_greedy_output_is_the_same_alone_and_batched(smollm2_gguf_path: Path, options: dict) -> None:
    """SmolLM2's head shape (3 KV heads of 64) is one where PyTorch's CPU flash attention, on several threads,
    rounds a row by the number of rows in the call: kvserve's paged kernel computes every row alone (the
    default), and on the gather + SDPA path batch_invariant runs decode attention on one thread. int4-a8's rows
    are quantized each on its own, so it keeps the promise too."""
    if options.get("quantization") and (reason := refusal("float32", options["quantization"])):
        pytest.skip(f"refused on this CPU: {reason}")
    llm = LLM(str(smollm2_gguf_path), enable_prefix_caching=False, speculative=None, **options)
    assert llm.engine.runner.native_decode == ("attention_backend" not in options)
    if "quantization" in options:
        assert llm.engine.quantization.startswith(options["quantization"] + "+")
    from bench.common import chat_prompt_ids

    # Chat prompts of 41-44 tokens: they decode in one attention call (one block-table length), where
    # with plain SDPA (2+ threads) one of them parted from its output alone after 8 tokens.
    prompts = chat_prompt_ids(llm.tokenizer, 4)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    alone = [llm.generate([ids], params)[0].outputs[0] for ids in prompts]
    batched = [out.outputs[0] for out in llm.generate(prompts, params)]
    for one, many in zip(alone, batched, strict=True):
        assert many.token_ids == one.token_ids
        assert [lp.logprob for lp in many.logprobs] == [lp.logprob for lp in one.logprobs]


def test_batch_invariant_gives_the_same_output_from_the_prefix_cache(smollm2_gguf_path: Path) -> None:
    """The second of two identical requests finds its prompt in the prefix cache and computes only the last
    block's tokens: with batch_invariant their attention is the kernel's, row for row as the first time.
    (Without it, SDPA over the cached keys rounds differently: on this prompt the logprobs parted, measured
    on Intel Sapphire Rapids at 2 threads.)"""
    llm = LLM(str(smollm2_gguf_path), speculative=None, batch_invariant=True)
    messages = [{"role": "user", "content": "Copy this Python code exactly:\n\ndef total(prices, tax):\n"
                 "    subtotal = sum(prices)\n    return subtotal + subtotal * tax\n"}]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, logprobs=0)
    first, second = (llm.chat(messages, params)[0].outputs[0] for _ in range(2))
    assert llm.engine.blocks.prefix_hits > 0
    assert second.token_ids == first.token_ids
    assert [lp.logprob for lp in second.logprobs] == [lp.logprob for lp in first.logprobs]
