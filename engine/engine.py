"""LLMEngine: requests in, one forward pass per step(), text deltas out.

A step is: apply aborts, schedule, run the model, sample, detokenize and check stop conditions.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig, ModelConfig, resolve_device, resolve_dtype
from engine.converted import load_converted, save_converted
from engine.grammar import CompiledGrammar, GrammarCompiler, GrammarMatcher, fill_bitmasks
from engine.kv_cache import BlockManager
from engine.models.cpu_matmul import keeps_4bit, pack_linears, resolve_quantization, rows_cost_arithmetic
from engine.models.layers import pin_submodules
from engine.models_registry import resolve_model
from engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from engine.pooling import EmbeddingParams, Pooler, PoolingMethod, read_pooling_method
from engine.runner import ModelRunner, StepLogits, kv_bytes_per_block, wants_prompt_logits
from engine.sampling import SamplingRow, make_generator, prompt_logprobs, sample, verify_drafts
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence
from engine.speculative import draft_limit, for_kernels, propose, sequence_draft_limit, speculates
from engine.stop import StopStringMatcher
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.weights import load_model, read_model_config

log = logging.getLogger("kvserve.engine")

CPU_KV_CACHE_CAP = 1 << 30  # bytes (SmolLM2 fp32: ~23k tokens); RAM is shared with everything else


@dataclass(eq=False)
class _Sample:
    """One of a request's n outputs: its sequence and the text state built from it."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher | None
    generator: torch.Generator | None
    grammar: CompiledGrammar | None = None
    matcher: GrammarMatcher | None = None  # the grammar's state after this sample's output tokens
    matcher_epoch: int = 0  # seq.num_preemptions when the matcher was built (see _matcher)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    grammar: CompiledGrammar | None = None
    prompt_logprob_by_position: dict[int, TokenLogprob] = field(default_factory=dict)
    prompt_logprobs_sent: bool = False
    aborted: bool = False
    embedding_params: EmbeddingParams | None = None  # set for an embedding request
    embedding: list[float] | None = None

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None] | None:
        """All prompt logprobs (None first: nothing predicts token 0), once every position has one."""
        if self.params.prompt_logprobs is None or len(self.prompt_logprob_by_position) < len(self.prompt_ids) - 1:
            return None
        return [None] + [self.prompt_logprob_by_position[i] for i in range(1, len(self.prompt_ids))]

    @property
    def finished(self) -> bool:
        return self.aborted or (len(self.samples) == self.params.n and all(s.seq.is_finished for s in self.samples))


class LLMEngine:
    """The synchronous engine. Not thread-safe except abort(); AsyncEngine drives it from one thread."""

    def __init__(self, model: str, config: EngineConfig | None = None, progress: bool = True) -> None:
        self.config = config = config or EngineConfig()
        self.model_name = model
        self.model_path = path = resolve_model(model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        base_format = resolve_quantization(config.quantization, self.device, self.dtype)
        self.model, self.model_config, self.tokenizer = self._load(path, progress)
        max_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                      self.model_config.max_position_embeddings)
        num_blocks = self._num_kv_blocks(max_len)
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        if self.max_model_len < max_len:
            self._warn_context_lowered(max_len, num_blocks)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                   self.model_config.window_of_every_layer())
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.model_config, self.device, self.dtype, config.block_size, num_blocks,
                                  config.batch_invariant, config.attention_backend)
        # The formats in use, e.g. "int4+fp16": `auto` keeps a GGUF's 4-bit weights 4-bit (cpu_matmul.py).
        self.quantization = pack_linears(self.model, base_format,
                                         keeps_4bit(config.quantization, self.device, self.dtype))
        pin_submodules(self.model)
        # Drafts and the batch size speculation stops at, where the config leaves them to the kernels.
        self.speculative = config.speculative and for_kernels(
            config.speculative, self.device == "cpu" and rows_cost_arithmetic(self.quantization))
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._aborts: set[str] = set()
        self._abort_lock = threading.Lock()
        self._stats = EngineStats(num_kv_blocks_total=num_blocks)
        self.last_step_tokens = 0

    def _load(self, path: str, progress: bool) -> tuple[torch.nn.Module, ModelConfig, Tokenizer]:
        """Model, config and tokenizer; a GGUF on CPU fp32 goes through the converted-model cache."""
        cacheable = (self.config.cache_converted and os.path.isfile(path) and self.device == "cpu"
                     and self.dtype == torch.float32)
        if cacheable and (cached := load_converted(path, self.device, self.dtype, self.config.max_model_len)):
            return cached
        model_cfg = read_model_config(path)
        max_len = min(self.config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        model, model_cfg = load_model(path, self.device, self.dtype, max_len, progress=progress)
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size > model_cfg.vocab_size:  # its ids past the embedding would fail mid-request
            source = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
            raise ValueError(f"the tokenizer of {source} has {tokenizer.vocab_size} tokens, but the model's "
                             f"vocabulary (embedding rows) has {model_cfg.vocab_size}: they do not belong together")
        if cacheable:
            save_converted(path, self.dtype, model, model_cfg, tokenizer)
        return model, model_cfg, tokenizer

    def _num_kv_blocks(self, max_len: int) -> int:
        per_block = kv_bytes_per_block(self.model_config, self.dtype, self.config.block_size)
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.startswith("cuda"):
                free, _ = torch.cuda.mem_get_info(torch.device(self.device))
                budget = int(free * self.config.kv_cache_fraction)
            else:  # never more than max_num_seqs full-length sequences could use
                blocks_per_seq = -(-max_len // self.config.block_size)
                budget = min(CPU_KV_CACHE_CAP, self.config.max_num_seqs * blocks_per_seq * per_block)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={budget} holds no block of {self.config.block_size} tokens "
                             f"({per_block} bytes each)")
        return int(num_blocks)

    def _warn_context_lowered(self, asked: int, num_blocks: int) -> None:
        """Say that the KV cache cannot hold the context asked for, what it holds, and what to raise."""
        block_size = self.config.block_size
        per_block = kv_bytes_per_block(self.model_config, self.dtype, block_size)
        source = "--max-model-len" if self.config.max_model_len else "the model's context length"
        needed = -(-asked // block_size) * per_block
        log.warning(f"max_model_len lowered to {self.max_model_len} tokens: {asked} asked ({source}), but the KV "
                    f"cache ({num_blocks} blocks of {block_size} tokens, {num_blocks * per_block} bytes) holds only "
                    f"{self.max_model_len}; raise --kv-cache-bytes to at least {needed} for {asked} tokens, or ask "
                    f"for less with --max-model-len",
                    extra={"fields": {"max_model_len_asked": asked, "max_model_len": self.max_model_len,
                                      "kv_cache_bytes": num_blocks * per_block, "kv_cache_bytes_needed": needed}})

    # ---- requests -------------------------------------------------------------------------------

    @functools.cached_property
    def pooling_method(self) -> PoolingMethod:
        """How embedding requests pool (read on the first one, so a generation server never trips on it)."""
        return read_pooling_method(self.model_path, self.model_config.arch)

    def prepare_prompt(self, prompt: str | list[int], params: SamplingParams | EmbeddingParams) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length."""
        ids = self._prompt_ids(prompt)
        if isinstance(params, EmbeddingParams):
            return self._check_embedding_input(ids, params)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, "
                             f"but the prompt has {len(ids)} tokens (at least one must be left to generate)")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but "
                             f"{len(ids) + params.max_tokens} were requested ({len(ids)} in the prompt, "
                             f"{params.max_tokens} for the completion)")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} is more than max_num_seqs={self.config.max_num_seqs}")
        return ids

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.model_config.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _check_embedding_input(self, ids: list[int], params: EmbeddingParams) -> list[int]:
        if len(ids) > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, "
                             f"but the input has {len(ids)} tokens")
        hidden = self.model_config.hidden_size
        if params.dimensions is not None and params.dimensions > hidden:
            raise ValueError(f"dimensions={params.dimensions} is larger than this model's embedding size {hidden}")
        self.pooling_method  # noqa: B018 - a config it cannot use fails this request, not the step loop
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | EmbeddingParams,
                    arrival_time: float | None = None, prompt_ids: list[int] | None = None) -> None:
        """Queue a request (generation, or an embedding with EmbeddingParams). ValueError for an empty or
        too-long prompt, a reused request id or a structured output that does not compile (the service
        compiles it beforehand, off the step loop: this hits the cache)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = prompt_ids if prompt_ids is not None else self.prepare_prompt(prompt, params)
        grammar = self.grammars.compile(params.structured_output) if params.structured_output else None
        arrival = arrival_time or time.monotonic()
        embedding = params if isinstance(params, EmbeddingParams) else None
        seq_params = SamplingParams() if embedding is not None else params  # what the scheduler reads (n = 1)
        leader = Sequence(next(self._seq_ids), request_id, ids, seq_params, arrival_time=arrival)
        if embedding is not None:
            leader.pooler = Pooler(self.pooling_method, len(ids))
        request = _Request(request_id, prompt if isinstance(prompt, str) else None, ids, seq_params,
                           [self._new_sample(leader, grammar)], RequestMetrics(arrival, num_prompt_tokens=len(ids)),
                           embedding_params=embedding, grammar=grammar)
        self._requests[request_id] = request
        self.scheduler.add(leader)

    def _new_sample(self, seq: Sequence, grammar: CompiledGrammar | None) -> _Sample:
        params = seq.params
        return _Sample(
            seq=seq,
            detokenizer=IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens),
            stops=StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None,
            generator=make_generator(params.seed, seq.index, self.device),
            logprobs=[] if params.logprobs is not None else None,
            grammar=grammar,
            matcher=grammar.new_matcher() if grammar is not None else None,
            matcher_epoch=seq.num_preemptions,
        )

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request's blocks are freed at the next step boundary."""
        with self._abort_lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._aborts)

    def stats(self) -> EngineStats:
        s = self._stats
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.num_kv_blocks_used = self.blocks.num_blocks - self.blocks.num_free_blocks
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_queries, s.prefix_cache_hits = self.blocks.prefix_queries, self.blocks.prefix_hits
        return EngineStats(**{name: getattr(s, name) for name in s.__dataclass_fields__})

    def make_kv_cache_resident(self) -> threading.Thread | None:
        """Back the whole KV cache with memory now, on a background thread (returned; None on GPU), rather than
        as blocks are first used. Call it once the engine is warmed up: before, it slows the build
        (engine/resident_memory.py)."""
        return self.runner.make_kv_cache_resident()

    def reset_stats(self) -> None:
        """Zero the cumulative counters (after a warm-up, so metrics count only served requests)."""
        self._stats = EngineStats(num_kv_blocks_total=self.blocks.num_blocks)
        self.scheduler.num_preemptions = 0
        self.blocks.prefix_queries = self.blocks.prefix_hits = 0

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; outputs of the requests that moved."""
        outputs = self._apply_aborts()
        if self.speculative is not None:
            self._propose_drafts()
        batch = self.scheduler.schedule()
        self.last_step_tokens = batch.num_tokens
        if not batch.scheduled:
            return outputs
        results = self.runner.execute(batch)
        for item in batch.scheduled:
            seq = item.seq
            self._stats.prompt_tokens += max(0, min(seq.num_prompt_tokens, seq.num_computed_tokens + item.num_new_tokens)
                                             - seq.num_computed_tokens)
            # A verifying sequence's drafts count as computed once accepted (_verify); its last token now.
            seq.num_computed_tokens += 1 if item.verifies else item.num_new_tokens
            self.blocks.commit(seq)
        self._stats.num_steps += 1
        touched = self._sample(results) + self._finish_embeddings(batch)
        return outputs + [self._output(request) for request in touched]

    def _propose_drafts(self) -> None:
        """Guess the next tokens of each decoding sequence that may speculate, from its own earlier n-grams
        (engine/speculative.py: greedy or unseeded sampled requests without a grammar)."""
        config = self.speculative
        running = self.scheduler.running
        for seq in running:  # a sequence left out of the last batch may still hold its guesses
            seq.draft_token_ids = []
        limit = draft_limit(config, len(running))
        if limit == 0:
            return
        for seq in running:
            # Decoding: only its last token lacks K/V, and it has sampled before (the first token, which forks
            # n > 1 requests and ends prompt logprobs, is always sampled the plain way).
            if seq.num_computed_tokens != len(seq) - 1 or seq.num_output_tokens == 0 or not speculates(seq.params):
                continue
            # Never past the context or max_tokens: every draft accepted plus the token after them must fit.
            room = min(sequence_draft_limit(limit, seq.num_draft_steps, seq.num_drafts_kept), self.max_model_len - len(seq))
            if seq.params.max_tokens is not None:
                room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
            seq.draft_token_ids = propose(seq.token_ids, config, room)

    def _finish_embeddings(self, batch: SchedulerOutput) -> list[_Request]:
        """Embedding sequences whose whole input is computed: take the pooled vector, free the blocks."""
        done = []
        for item in batch.scheduled:
            seq = item.seq
            if seq.pooler is None or seq.num_computed_tokens < len(seq):
                continue
            request = self._requests[seq.request_id]
            request.embedding = seq.pooler.result(request.embedding_params.dimensions)
            self.scheduler.finish(seq, "stop")
            done.append(request)
        return done

    def _sample(self, results: list[StepLogits]) -> list[_Request]:
        rows: list[SamplingRow] = []
        targets: list[_Sample] = []
        logit_rows: list[torch.Tensor] = []
        touched_verified: list[_Request] = []
        for result in results:
            seq = result.seq
            request = self._requests[seq.request_id]
            if seq.draft_token_ids:
                self._verify(next(s for s in request.samples if s.seq is seq), result)
                touched_verified.append(request)
                continue
            if wants_prompt_logits(seq):
                self._record_prompt_logprobs(request, result)
            if seq.num_computed_tokens < len(seq):
                continue  # a prefill chunk that does not reach the end: nothing to sample yet
            samples = self._fork(request) if seq.num_output_tokens == 0 and len(request.samples) < request.params.n \
                else [next(s for s in request.samples if s.seq is seq)]
            for sample_ in samples:
                rows.append(SamplingRow(seq.params, sample_.seq.prompt_token_ids, sample_.seq.output_token_ids,
                                        sample_.generator, self.eos_token_ids))
                targets.append(sample_)
                logit_rows.append(result.logits[-1])
        touched: dict[str, _Request] = {request.request_id: request for request in touched_verified}
        if not rows:
            return list(touched.values())
        self._attach_token_bitmasks(rows, targets)
        chosen = sample(_as_matrix(logit_rows), rows)
        now = time.monotonic()
        for sample_, (token, logprob) in zip(targets, chosen, strict=True):
            self._append_token(sample_, token, logprob, now)
            touched[sample_.seq.request_id] = self._requests[sample_.seq.request_id]
        return list(touched.values())

    def _verify(self, sample_: _Sample, result: StepLogits) -> None:
        """Keep the drafts the model agrees with, and the model's own token after the last of them.

        Row j of the logits followed the last token and drafts[:j]: sampled with those as output so far, it
        gives the token plain decoding would choose there (greedy), or one drawn from the same distribution
        (speculative sampling, engine.sampling.verify_drafts). Tokens are appended one at a time, so stop
        strings, EOS and max_tokens end the sequence exactly where they would without speculation.
        """
        seq = sample_.seq
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        rows = [SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids + drafts[:j], sample_.generator,
                            self.eos_token_ids) for j in range(len(drafts) + 1)]
        now = time.monotonic()
        self._stats.spec_draft_tokens += len(drafts)
        seq.num_draft_steps += 1
        for j, (token, logprob) in enumerate(verify_drafts(result.logits, rows, drafts)):
            self._append_token(sample_, token, logprob, now)
            if seq.is_finished or j == len(drafts) or token != drafts[j]:
                break
            seq.num_computed_tokens += 1  # the draft fed as input j + 1 is this token: its K/V stand
            seq.num_drafts_kept += 1
            self._stats.spec_accepted_tokens += 1
        if not seq.is_finished:
            self.blocks.commit(seq)

    def _attach_token_bitmasks(self, rows: list[SamplingRow], targets: list[_Sample]) -> None:
        """Each guided row gets the packed mask of the tokens its grammar allows next (one bitmask for the batch)."""
        guided = [i for i, sample_ in enumerate(targets) if sample_.grammar is not None]
        if not guided:
            return
        bitmask = fill_bitmasks([self._matcher(targets[i]) for i in guided], self.grammars.vocab_size)
        for row_index, i in enumerate(guided):
            rows[i].token_bitmask = bitmask[row_index]

    def _matcher(self, sample_: _Sample) -> GrammarMatcher:
        """The sample's matcher, rebuilt by replaying its output tokens if the sequence was preempted since:
        a recompute must not trust state built before it."""
        seq = sample_.seq
        if sample_.matcher is None or sample_.matcher_epoch != seq.num_preemptions:
            assert sample_.grammar is not None
            sample_.matcher = sample_.grammar.new_matcher()
            for token in seq.output_token_ids:
                sample_.matcher.accept(token)
            sample_.matcher_epoch = seq.num_preemptions
        return sample_.matcher

    def _fork(self, request: _Request) -> list[_Sample]:
        """The prompt of an n > 1 request is computed once; its n samples then share those blocks."""
        leader = request.samples[0].seq
        for index in range(1, request.params.n):
            child = Sequence(next(self._seq_ids), request.request_id, list(leader.prompt_token_ids), request.params,
                             index=index, arrival_time=leader.arrival_time, token_ids=list(leader.token_ids),
                             num_computed_tokens=leader.num_computed_tokens,
                             first_scheduled_time=leader.first_scheduled_time)
            self.blocks.fork(leader, child)
            self.scheduler.add_running(child)
            request.samples.append(self._new_sample(child, request.grammar))
        return request.samples

    def _append_token(self, sample_: _Sample, token: int, logprob: TokenLogprob | None, now: float) -> None:
        seq, params = sample_.seq, sample_.seq.params
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        self._stats.generation_tokens += 1
        sample_.delta_ids.append(token)
        if logprob is not None and sample_.logprobs is not None:
            sample_.logprobs.append(logprob)
            sample_.delta_logprobs.append(logprob)
        finish, stop_reason = None, None
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if token in params.stop_token_ids:
            finish, stop_reason = "stop", token
        elif is_eos:
            finish = "stop"
        if finish is None or params.include_stop_str_in_output:
            self._emit(sample_, sample_.detokenizer.add([token]))
        if finish is None and sample_.stops is not None and sample_.stops.matched is not None:
            finish, stop_reason = "stop", sample_.stops.matched
        if sample_.matcher is not None:
            finish = self._advance_grammar(sample_, token, finish)
        if finish is None and params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            finish = "length"
        if finish is None and len(seq) >= self.max_model_len:
            finish = "length"
        if finish is not None:
            if sample_.stops is None or sample_.stops.matched is None:
                self._emit(sample_, sample_.detokenizer.flush())
                if sample_.stops is not None:
                    sample_.delta_text += sample_.stops.flush()
            seq.stop_reason = stop_reason
            sample_.matcher = None
            self.scheduler.finish(seq, finish)

    def _advance_grammar(self, sample_: _Sample, token: int, finish: str | None) -> str | None:
        """Advance the grammar over the sampled token: a complete grammar ends the sequence with "stop"."""
        matcher = sample_.matcher
        assert matcher is not None
        if not matcher.accept(token):
            # The mask only lets through tokens the grammar allows; reaching this is a bug, not bad input.
            log.error("grammar rejected a sampled token", extra={"fields": {
                "request_id": sample_.seq.request_id, "token": token, "error": matcher.error}})
            return "abort"
        return "stop" if finish is None and matcher.is_complete else finish

    def _emit(self, sample_: _Sample, new_text: str) -> None:
        """Pass detokenized text through the stop-string matcher and add what is safe to the output."""
        if not new_text:
            return
        if sample_.stops is not None:
            new_text, _ = sample_.stops.feed(new_text)
        sample_.delta_text += new_text

    def _record_prompt_logprobs(self, request: _Request, result: StepLogits) -> None:
        """Logprob of each prompt token given the ones before it, by position (a recompute overwrites)."""
        ids = request.prompt_ids
        first = result.first_position
        last = min(first + result.logits.shape[0], len(ids) - 1)  # predictions of positions first+1 .. last
        if last > first:
            entries = prompt_logprobs(result.logits[: last - first], ids[first + 1:last + 1],
                                      request.params.prompt_logprobs or 0)
            for offset, entry in enumerate(entries):
                request.prompt_logprob_by_position[first + 1 + offset] = entry

    def _apply_aborts(self) -> list[RequestOutput]:
        with self._abort_lock:
            aborts, self._aborts = self._aborts, set()
        outputs = []
        for request_id in aborts:
            request = self._requests.get(request_id)
            if request is None:
                continue  # already finished
            for sample_ in request.samples:
                if not sample_.seq.is_finished:
                    self.scheduler.finish(sample_.seq, "abort")
            request.aborted = True
            outputs.append(self._output(request))
        return outputs

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for index, sample_ in enumerate(request.samples):
            seq = sample_.seq
            sample_.text += sample_.delta_text
            completions.append(CompletionOutput(
                index=index, text=sample_.text, token_ids=seq.output_token_ids,
                logprobs=list(sample_.logprobs) if sample_.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=sample_.delta_text, delta_token_ids=sample_.delta_ids,
                delta_logprobs=sample_.delta_logprobs if sample_.logprobs is not None else None,
            ))
            sample_.delta_text, sample_.delta_ids, sample_.delta_logprobs = "", [], []
        # An n > 1 request aborted before its prompt finished never forked: its other outputs end empty.
        completions += [CompletionOutput(index=i, finish_reason="abort")
                        for i in range(len(completions), request.params.n) if request.aborted]
        finished = request.finished
        metrics = request.metrics
        seqs = [s.seq for s in request.samples]
        metrics.first_scheduled_time = seqs[0].first_scheduled_time
        firsts = [s.first_token_time for s in seqs if s.first_token_time]
        metrics.first_token_time = min(firsts) if firsts else None
        metrics.last_token_time = max((s.last_token_time or 0 for s in seqs), default=None) or None
        metrics.num_generation_tokens = sum(s.num_output_tokens for s in seqs)
        metrics.num_cached_tokens = seqs[0].num_cached_prompt_tokens
        metrics.num_preemptions = sum(s.num_preemptions for s in seqs)
        if finished:
            metrics.finished_time = time.monotonic()
            del self._requests[request.request_id]
        # Prompt logprobs go out once complete (the first output after prefill, for echo in streams) and at the end.
        prompt_lp = request.prompt_logprobs
        complete = prompt_lp is not None
        send_prompt_lp = complete and (finished or not request.prompt_logprobs_sent)
        request.prompt_logprobs_sent |= send_prompt_lp
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, completions, finished,
                             prompt_lp if send_prompt_lp else None, metrics, request.embedding)


def _as_matrix(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(rows), without the copy where they already lie one after another in one tensor: a decode
    step's last-token logits do (every sequence one row of compute_logits' output), and stacking them copied
    12 MB a step at batch 64 (sampling reads its input and never writes it)."""
    first = rows[0]
    width = first.numel()
    storage = first.untyped_storage().data_ptr()
    if all(row.dim() == 1 and row.stride(0) == 1 and row.untyped_storage().data_ptr() == storage
           and row.storage_offset() == first.storage_offset() + i * width for i, row in enumerate(rows)):
        return first.as_strided((len(rows), width), (width, 1))
    return torch.stack(rows)
