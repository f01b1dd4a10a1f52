"""LLM: the offline, synchronous API (vLLM's shape)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.pooling import EmbeddingParams
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM("smollm2-135m").generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))`."""

    def __init__(self, model: str = "smollm2-135m", device: str = "auto", dtype: str = "auto",
                 progress: bool = False, **engine_options) -> None:
        self.engine = LLMEngine(model, EngineConfig(device=device, dtype=dtype, **engine_options), progress=progress)
        self.engine.make_kv_cache_resident()
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | EmbeddingParams | Sequence[SamplingParams | EmbeddingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs in the order given."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, per_prompt, strict=True):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p)
            order.append(request_id)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for output in self.engine.step():
                if output.finished:
                    done[output.request_id] = output
        return [done[request_id] for request_id in order]

    def embed(self, inputs: Prompt | Sequence[Prompt], dimensions: int | None = None) -> list[list[float]]:
        """L2-normalized embeddings of texts or token-id lists, pooled as the model's config says."""
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        outputs = self.generate(inputs, [EmbeddingParams(dimensions)] * len(inputs))
        return [output.embedding for output in outputs]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt(conversation) for conversation in conversations]
        return self.generate(prompts, params)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt as they are generated."""
        request_id = f"offline-{next(self._ids)}"
        self.engine.add_request(request_id, prompt, params or SamplingParams())
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id == request_id:
                        if output.outputs[0].delta_text:
                            yield output.outputs[0].delta_text
                        if output.finished:
                            return
        finally:
            self.engine.abort(request_id)
            while self.engine.has_unfinished():
                self.engine.step()
