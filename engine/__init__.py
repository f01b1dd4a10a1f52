"""kvserve's inference engine: models, paged KV cache, continuous batching, sampling. No HTTP here."""

from engine import torch_import

torch_import.install()  # before the first `import torch` below

# ruff: noqa: E402 - the imports below come after that
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "EngineDeadError", "EngineStats",
           "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams", "TokenLogprob"]
