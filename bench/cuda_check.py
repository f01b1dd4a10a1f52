"""CUDA check: kvserve on a GPU against transformers on the same GPU, each system in its own process.

Random weights with the SmolLM2-135M shape (its config.json and tokenizer.json, read from a folder given
by --model-files: the converted-model cache holds both) stand in for the real model, because the GPU
machine cannot reach a hub and the GGUF is too large to carry there; speed does not depend on the values.

1. Exactness (fp32): a 4-layer random model with sharp weights; kvserve's greedy continuations and
   token logprobs against transformers' on the same GPU.
2. Batch invariance: greedy continuations of mixed-length prompts alone and all together, fp32 and bf16.
3. Throughput (bf16, 30 layers, 128 new tokens, EOS ignored) at batch 1/16/64: kvserve, then
   transformers `generate` in a subprocess of its own.

`python -m bench.cuda_check --model-files DIR --output OUT.json`; prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import markdown_table, random_prompt_ids

BATCHES = (1, 16, 64)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_model_dir(files: Path, out: Path, layers: int | None, std: float | None, dtype: torch.dtype) -> Path:
    """Save a random Llama with SmolLM2's config (optionally fewer layers, sharper weights) beside its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(files)
    if layers is not None:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else std * torch.randn_like(param))
    model.to(dtype).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (files / name).is_file():
            shutil.copy(files / name, out / name)
    return out


def kvserve_llm(model_dir: Path, dtype: str, device: str, quantization: str = "auto"):
    from engine import LLM

    return LLM(str(model_dir), device=device, dtype=dtype, quantization=quantization, max_num_seqs=64)


def check_exactness(model_dir: Path, prompts: list[list[int]], device: str, max_tokens: int = 32) -> dict:
    """Greedy tokens equal and logprobs close to transformers in fp32."""
    from transformers import AutoModelForCausalLM

    from engine import SamplingParams

    llm = kvserve_llm(model_dir, "float32", device, quantization="none")
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0))
    del llm
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(device).eval()
    equal, max_err = 0, 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            ref = hf.generate(ids, do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              temperature=None, top_p=None, top_k=None)[0, len(prompt):].tolist()
            full = torch.tensor([prompt + out.outputs[0].token_ids], device=device)
            logprobs = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
        equal += ref == out.outputs[0].token_ids
        for step, entry in enumerate(out.outputs[0].logprobs):
            expected = logprobs[len(prompt) - 1 + step, entry.token_id].item()
            max_err = max(max_err, abs(expected - entry.logprob))
    return {"prompts": len(prompts), "greedy_equal": equal, "max_logprob_abs_err": max_err}


def check_batch_invariance(model_dir: Path, prompts: list[list[int]], dtype: str, device: str,
                           max_tokens: int = 32) -> dict:
    from engine import SamplingParams

    llm = kvserve_llm(model_dir, dtype, device)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    del llm
    return {"dtype": dtype, "prompts": len(prompts), "equal": sum(a == b for a, b in zip(alone, together, strict=True))}


def kvserve_throughput(model_dir: Path, prompts: list[list[int]], max_tokens: int, device: str) -> dict[str, float]:
    from engine import SamplingParams

    llm = kvserve_llm(model_dir, "bfloat16", device)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    results = {}
    for size in BATCHES:
        _sync(device)
        start = time.perf_counter()
        outs = llm.generate(prompts[:size], params)
        seconds = time.perf_counter() - start
        results[str(size)] = sum(len(o.outputs[0].token_ids) for o in outs) / seconds
    return results


def transformers_throughput(model_dir: Path, prompts: list[list[int]], max_tokens: int,
                            device: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from bench.hf_peer import hf_generate

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(device).eval()
    hf_generate(model, prompts[:4], 4, pad_id=0)
    results = {}
    for size in BATCHES:
        _sync(device)
        run = hf_generate(model, prompts[:size], max_tokens, pad_id=0)
        results[str(size)] = run.new_tokens / run.seconds
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-files", required=True, help="folder with SmolLM2's config.json and tokenizer.json")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--output", default=None)
    parser.add_argument("--device", default="cuda", help="cpu for a dry run of the script itself")
    parser.add_argument("--transformers-only", default=None, help=argparse.SUPPRESS)  # the subprocess's model dir
    args = parser.parse_args()
    files = Path(args.model_files)
    vocab = json.loads((files / "config.json").read_text())["vocab_size"]
    prompts = random_prompt_ids(64, 40, vocab, seed=1)
    if args.transformers_only:
        print(json.dumps(transformers_throughput(Path(args.transformers_only), prompts, args.max_tokens, args.device)))
        return

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    report: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        sharp = make_model_dir(files, Path(tmp) / "sharp", layers=4, std=0.1, dtype=torch.float32)
        mixed = [random_prompt_ids(1, length, vocab, seed=length)[0] for length in (3, 17, 40, 90, 200, 333)]
        report["exactness_fp32"] = check_exactness(sharp, mixed, args.device)
        print("exactness:", report["exactness_fp32"], flush=True)
        report["batch_invariance"] = [check_batch_invariance(sharp, mixed * 3, dtype, args.device) for dtype in ("float32", "bfloat16")]
        print("batch invariance:", report["batch_invariance"], flush=True)

        full = make_model_dir(files, Path(tmp) / "full", layers=None, std=None, dtype=torch.bfloat16)
        report["kvserve_tok_s"] = kvserve_throughput(full, prompts, args.max_tokens, args.device)
        print("kvserve:", report["kvserve_tok_s"], flush=True)
        hf = subprocess.run([sys.executable, "-m", "bench.cuda_check", "--model-files", str(files),
                             "--max-tokens", str(args.max_tokens), "--device", args.device,
                             "--transformers-only", str(full)],
                            capture_output=True, text=True, check=True)
        report["transformers_tok_s"] = json.loads(hf.stdout.strip().splitlines()[-1])
        print("transformers:", report["transformers_tok_s"], flush=True)

    kv, hf_rates = report["kvserve_tok_s"], report["transformers_tok_s"]
    print(markdown_table(["batch", "kvserve bf16 tok/s", "transformers bf16 tok/s", "ratio"],
                         [[b, f"{kv[str(b)]:.1f}", f"{hf_rates[str(b)]:.1f}", f"{kv[str(b)] / hf_rates[str(b)]:.2f}x"]
                          for b in BATCHES]))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
