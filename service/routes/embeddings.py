"""POST /v1/embeddings in OpenAI's format: each input becomes one engine request (a prefill-only sequence in
the shared batch) whose pooled, L2-normalized final hidden state comes back as floats or base64."""

from __future__ import annotations

import base64
import struct
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from engine.pooling import EmbeddingParams
from service.errors import APIError
from service.generation import Prompt, RunOutcome, merge, run_engine
from service.middleware import LOG_FIELDS_KEY, REQUEST_ID_KEY
from service.protocol import ErrorResponse, StrictModel, TokenId
from service.state import ServerState, get_state

router = APIRouter(tags=["openai"])

MAX_INPUTS = 2048  # OpenAI's limit on inputs in one request
ENDPOINT = "/v1/embeddings"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in ((400, "invalid input, input too long or dimensions too large"), (401, "missing or wrong API key"),
                       (404, "unknown model"), (429, "waiting queue full"), (503, "loading or shutting down"),
                       (504, "request timeout"))
}


class EmbeddingRequest(StrictModel):
    model: str | None = Field(None, description="served model name; omitted means the one served model")
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of such lists")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: the little-endian float32 bytes of each vector, base64-encoded")
    dimensions: Annotated[int, Field(ge=1)] | None = Field(
        None, description="keep the first N values and re-normalize (Matryoshka models)")
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding to return: a text or a list of token ids."""
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]
        return list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@router.post(ENDPOINT, response_model=EmbeddingResponse, responses=_ERRORS)
async def create_embeddings(body: EmbeddingRequest, request: Request,
                            state: ServerState = Depends(get_state)) -> EmbeddingResponse:
    """Embeddings of one or more inputs, pooled as the model's sentence-transformers config says."""
    state.check_model(body.model)
    size = state.require_engine().embedding_size
    if body.dimensions is not None and size is not None and body.dimensions > size:
        raise APIError(400, f"dimensions={body.dimensions} is larger than this model's embedding size {size}",
                       param="dimensions")
    prompts = [_prompt(state, item, i) for i, item in enumerate(_checked_inputs(body))]
    state.admit(len(prompts))
    params = EmbeddingParams(body.dimensions)
    request_id = request.scope[REQUEST_ID_KEY]
    outcomes = [RunOutcome() for _ in prompts]
    streams = [run_engine(state, f"{request_id}-{i}", p, params, o)
               for i, (p, o) in enumerate(zip(prompts, outcomes, strict=True))]
    vectors: dict[int, list[float]] = {}
    outputs = merge(streams)
    try:
        async for index, out in outputs:
            if out.finished and out.embedding is not None:  # None: aborted (shutdown or timeout)
                vectors[index] = out.embedding
    finally:
        await outputs.aclose()
    if any(o.timed_out for o in outcomes):
        raise APIError(504, f"request timed out after {state.settings.request_timeout} s")
    if len(vectors) < len(prompts):
        raise APIError(503, "request aborted: server is shutting down", code="shutting_down")
    num_tokens = sum(len(p.token_ids) for p in prompts)
    request.scope.setdefault(LOG_FIELDS_KEY, {})["prompt_tokens"] = num_tokens
    state.metrics.observe_endpoint(ENDPOINT)
    return EmbeddingResponse(
        data=[Embedding(index=i, embedding=_encode(vectors[i], body.encoding_format)) for i in range(len(prompts))],
        model=state.model_name, usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))


def _checked_inputs(body: EmbeddingRequest) -> list[str | list[int]]:
    inputs = body.inputs()
    if not inputs:
        raise APIError(400, "input is empty: send a text, a list of texts or a list of token ids", param="input")
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"input has {len(inputs)} entries; at most {MAX_INPUTS} are allowed", param="input")
    return inputs


def _prompt(state: ServerState, item: str | list[int], index: int) -> Prompt:
    """Token ids of one input, checked against the vocabulary and the context length."""
    loaded = state.require_engine()
    where = f"input[{index}]"
    ids = loaded.tokenizer.encode(item) if isinstance(item, str) else list(item)
    if not ids:
        raise APIError(400, f"{where} is empty", param="input")
    bad = [t for t in ids if t >= loaded.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"{where}: token id {bad[0]} is out of range (vocabulary size "
                            f"{loaded.tokenizer.vocab_size})", param="input")
    if len(ids) > loaded.max_model_len:
        raise APIError(400, f"This model's maximum context length is {loaded.max_model_len} tokens; {where} has "
                            f"{len(ids)} tokens.", param="input", code="context_length_exceeded")
    return Prompt(token_ids=ids, max_tokens=0, text=item if isinstance(item, str) else None)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
