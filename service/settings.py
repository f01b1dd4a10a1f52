"""Server settings: every field is a KVSERVE_* env var and a `kvserve serve` flag (see cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The CPU weight formats (engine.models.cpu_matmul.QUANTIZATIONS), spelled out so the service needs no torch.
Quantization = Literal["auto", "none", "bf16", "fp16", "int8", "int4", "int4-a8"]
# Tool-call formats of tool_choice "auto" (service.tools.PARSERS), vLLM's --tool-call-parser names.
ToolCallParserName = Literal["hermes", "llama3_json", "mistral"]


_OFF = ("off", "none", "")  # --speculative-config values that turn speculation off


def _unset(meaning: str) -> dict[str, str]:
    """Field metadata: what an unset (None) setting means, which --help shows as its default."""
    return {"unset_means": meaning}


def unset_meaning(name: str) -> str | None:
    """What leaving setting `name` unset (None, or an empty list) means, as --help shows it."""
    extra = Settings.model_fields[name].json_schema_extra
    return extra.get("unset_means") if isinstance(extra, dict) else None  # type: ignore[return-value]


class Settings(BaseSettings):
    """What `kvserve serve` runs with: command line over environment over these defaults."""

    model_config = SettingsConfigDict(env_prefix="KVSERVE_", extra="ignore", protected_namespaces=())

    model: str = Field("smollm2-135m", description="registry name (smollm2-135m), GGUF file or HF checkpoint dir")
    served_model_name: str | None = Field(None, description="name clients send as `model`",
                                          json_schema_extra=_unset("the --model value"))
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    dtype: str = Field("auto", description="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16")
    quantization: Quantization = Field(
        "auto", description="CPU matmul weights: auto (4-bit GGUF weights kept int4, the rest bf16 with AMX, else "
                "fp16 on x86), none (exact fp32), bf16, fp16, int8 (lossy), int4 (lossy unless 4-bit in the file), int4-a8 "
                "(auto's weights, 8-bit activations into the 4-bit ones as llama.cpp: faster on AVX2, lossy)")
    # The engine's defaults, spelled out so --help shows them (tests/unit/test_service_settings.py checks they agree).
    max_num_seqs: int = Field(64, ge=1, description="most sequences decoded together")
    max_num_batched_tokens: int = Field(1024, ge=1, description="most tokens in one forward pass (prefill chunk size)")
    kv_cache_bytes: int | None = Field(None, gt=0, description="KV cache size in bytes",
                                       json_schema_extra=_unset(
        "on CPU what max_num_seqs full-length sequences need, at most 1 GiB; on CUDA half the free memory"))
    max_model_len: int | None = Field(None, ge=1, description="context length cap", json_schema_extra=_unset("the model's"))
    speculative_config: str = Field(
        '{"method": "ngram"}', description='n-gram speculative decoding while few sequences run, vLLM\'s JSON: '
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2, '
        '"disable_by_batch_size": 2} (num_speculative_tokens, unset: 3, or 1 where the 4-bit layers run the integer '
        'kernels\' AVX2 build); "off" turns it off')
    batch_invariant: bool = Field(False, description="a request's output never depends on its batch, prefix-cache "
                                  "hits or prompt chunking: prompt attention through kvserve's paged kernel too "
                                  "(slower prefill of long prompts; see README)")
    attention_backend: Literal["auto", "native", "sdpa"] = Field(
        "auto", description="decode attention: auto (kvserve's paged CPU kernel where it builds, else sdpa), native "
        "(the kernel or an error), sdpa (gather KV blocks for PyTorch's SDPA)")
    max_tokens_default: int | None = Field(
        None, ge=1, description="cap on the tokens a request without max_tokens generates (completions: 16, chat: "
                                "the rest of the context)", json_schema_extra=_unset("no cap"))
    max_waiting_requests: int = Field(256, ge=1, description="queued requests beyond which new ones get 429")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys (comma-separated in the env var)",
        json_schema_extra=_unset("none: no auth"))
    api_key_file: Path | None = Field(None, description="file with one accepted API key per line",
                                      json_schema_extra=_unset("none"))
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests may run after SIGTERM")
    request_timeout: float | None = Field(None, gt=0, description="seconds before a request is aborted",
                                          json_schema_extra=_unset("none"))
    request_body_timeout: float = Field(30.0, gt=0, description="seconds a client has to send its request body "
                                                                "after the headers; then 408")
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: str = Field("info", description="debug, info, warning, error")
    log_requests_text: bool = Field(False, description="include prompt and completion text in request logs")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body, in bytes")
    inspect_max_tokens: int = Field(256, ge=1, description="longest prompt the inspection API accepts, in tokens")
    inspect_max_bytes: int = Field(64 << 20, ge=1024, description="largest inspection response, in bytes")
    otlp_traces_endpoint: str | None = Field(
        None, description="send OpenTelemetry traces here by OTLP (vLLM's flag; OTEL_* env vars configure the "
                          "rest, see README)", json_schema_extra=_unset("tracing off"))
    chat_template: str | None = Field(None, description="chat template file or Jinja text replacing the model's",
                                      json_schema_extra=_unset("the model's own"))
    tool_call_parser: ToolCallParserName | None = Field(
        None, description="tool-call format parsed with tool_choice auto: hermes, llama3_json, mistral",
        json_schema_extra=_unset("detected from the chat template"))

    @field_validator("chat_template")
    @classmethod
    def _load_chat_template(cls, value: str | None) -> str | None:
        # Read the file and compile the template at startup, so a bad one stops the server at once.
        # Imported here: the engine package loads torch, which `kvserve --help` should not wait for.
        from engine.chat_template import load_chat_template

        return load_chat_template(value) if value is not None else None

    @field_validator("speculative_config")
    @classmethod
    def _check_speculative_config(cls, value: str) -> str:
        from engine.speculative import NgramConfig  # a bad config stops the server at once

        if value.strip().lower() in _OFF:
            return "off"
        NgramConfig.parse(value)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        # Env vars arrive as one string; accept "k1,k2" as well as repeated flags.
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc}") from exc
            extra = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            self.api_keys = [*self.api_keys, *(k for k in extra if k not in self.api_keys)]
        return self

    @property
    def model_name(self) -> str:
        """The name clients use in `model`."""
        return self.served_model_name or self.model

    def engine_config_kwargs(self) -> dict[str, object]:
        """EngineConfig keyword arguments that were set (unset ones keep the engine's defaults)."""
        from engine.speculative import NgramConfig

        names = ("device", "dtype", "quantization", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes",
                 "max_model_len", "batch_invariant", "attention_backend")
        kwargs: dict[str, object] = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        kwargs["speculative"] = None if self.speculative_config == "off" else NgramConfig.parse(self.speculative_config)
        return kwargs
