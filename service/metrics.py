"""Prometheus metrics, one registry per app: gauges read from engine stats at scrape time,
counters and histograms fed by request outcomes and engine steps. Each number goes out under
kvserve's name and vLLM's (metrics_vllm.py), with the process's own metrics beside them."""

from __future__ import annotations

import threading

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine.outputs import EngineStats, RequestMetrics
from service.metrics_vllm import VllmMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
SUCCESS_REASONS = ("stop", "length")
ABORT_REASONS = ("client_disconnected", "timeout", "shutdown")
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServiceMetrics:
    """All kvserve_* metrics for one served model."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, m = self.registry, ["model"]
        self.running = Gauge("kvserve_num_requests_running", "Requests being decoded", m, registry=reg)
        self.waiting = Gauge("kvserve_num_requests_waiting", "Requests queued for admission", m, registry=reg)
        self.kv_usage = Gauge("kvserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)", m,
                              registry=reg)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens of finished requests", m, registry=reg)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Generated tokens", m, registry=reg)
        self.success = Counter("kvserve_request_success", "Sequences that finished with stop or length",
                               [*m, "finish_reason"], registry=reg)
        self.requests = Counter("kvserve_requests", "Requests answered successfully, by endpoint",
                                [*m, "endpoint"], registry=reg)
        self.aborted = Counter("kvserve_request_aborted", "Sequences aborted before they finished, by reason",
                               [*m, "reason"], registry=reg)
        self.errors = Counter("kvserve_request_errors", "Error responses by HTTP status", [*m, "code"], registry=reg)
        self.preemptions = Counter("kvserve_num_preemptions", "Sequences preempted by the scheduler", m, registry=reg)
        self.prefix_queries = Counter("kvserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      m, registry=reg)
        self.prefix_hits = Counter("kvserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", m,
                                   registry=reg)
        self.spec_draft_tokens = Counter("kvserve_spec_decode_num_draft_tokens",
                                         "Draft tokens checked by n-gram speculative decoding", m, registry=reg)
        self.spec_accepted_tokens = Counter("kvserve_spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted (each one a forward pass saved)", m, registry=reg)
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Arrival to first token", m,
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("kvserve_inter_token_latency_seconds", "Time between generated tokens", m,
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Arrival to finish", m,
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram("kvserve_request_queue_time_seconds", "Arrival to first scheduled", m,
                                    buckets=_LATENCY_BUCKETS, registry=reg)
        self.request_prompt_tokens = Histogram("kvserve_request_prompt_tokens", "Prompt tokens per request", m,
                                               buckets=_TOKEN_BUCKETS, registry=reg)
        self.request_generation_tokens = Histogram("kvserve_request_generation_tokens",
                                                   "Generated tokens per request", m, buckets=_TOKEN_BUCKETS,
                                                   registry=reg)
        self.iteration_tokens = Histogram("kvserve_iteration_tokens", "Tokens in one engine step", m,
                                          buckets=_TOKEN_BUCKETS, registry=reg)
        self.vllm = VllmMetrics(reg, model_name)
        # process_resident_memory_bytes, process_cpu_seconds_total, python_gc_*, python_info: what
        # prometheus_client's default registry carries, read from this process at scrape time.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            reg.register(collector)
        self._last_stats = EngineStats()
        self._sync_lock = threading.Lock()
        # Create every labelled child now so each series shows (at 0) before the first request.
        for metric in (self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                       self.preemptions, self.prefix_queries, self.prefix_hits, self.spec_draft_tokens,
                       self.spec_accepted_tokens, self.ttft, self.itl, self.e2e,
                       self.queue_time, self.request_prompt_tokens, self.request_generation_tokens,
                       self.iteration_tokens):
            metric.labels(model_name)
        for reason in SUCCESS_REASONS:
            self.success.labels(model_name, reason)
        self.requests.labels(model_name, "/v1/embeddings")
        for reason in ABORT_REASONS:
            self.aborted.labels(model_name, reason)

    def observe_step(self, num_tokens: int) -> None:
        """AsyncEngine's on_step callback (engine thread; prometheus_client is thread-safe)."""
        self.iteration_tokens.labels(self.model_name).observe(num_tokens)

    def observe_endpoint(self, endpoint: str) -> None:
        self.requests.labels(self.model_name, endpoint).inc()

    def observe_error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def observe_finished_sequence(self, finish_reason: str) -> None:
        """A sequence that ended on its own (stop or length); aborts go to observe_aborted."""
        self.success.labels(self.model_name, finish_reason).inc()
        self.vllm.observe_finished(finish_reason)

    def observe_aborted(self, reason: str) -> None:
        """A sequence cut short: the client left, the request timed out or the server is shutting down."""
        self.aborted.labels(self.model_name, reason).inc()
        self.vllm.observe_finished("abort")

    def observe_itl(self, seconds: float, num_tokens: int) -> None:
        """`num_tokens` arrived `seconds` after the previous ones: one ITL sample per token."""
        child = self.itl.labels(self.model_name)
        per_token = seconds / max(num_tokens, 1)
        for _ in range(num_tokens):
            child.observe(per_token)
            self.vllm.observe_itl(per_token)

    def observe_request(self, prompt_tokens: int, generation_tokens: int, metrics: RequestMetrics | None,
                        e2e_seconds: float) -> None:
        """Counts and latencies of one finished (or aborted) engine request."""
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generation_tokens.labels(name).inc(generation_tokens)
        self.request_prompt_tokens.labels(name).observe(prompt_tokens)
        self.request_generation_tokens.labels(name).observe(generation_tokens)
        self.e2e.labels(name).observe(e2e_seconds)
        self.vllm.observe_request(prompt_tokens, generation_tokens, metrics, e2e_seconds)
        if metrics is None:
            return
        if metrics.first_token_time is not None:
            self.ttft.labels(name).observe(max(metrics.first_token_time - metrics.arrival_time, 0.0))
        if metrics.first_scheduled_time is not None:
            self.queue_time.labels(name).observe(max(metrics.first_scheduled_time - metrics.arrival_time, 0.0))

    def sync_engine_stats(self, stats: EngineStats) -> None:
        """Set gauges and advance cumulative counters by what the engine did since the last sync."""
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.kv_cache_usage)
        self.vllm.observe_state(stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        with self._sync_lock:
            last = self._last_stats
            vllm = self.vllm
            for counters, now, before in (
                    ((self.preemptions.labels(name), vllm.preemptions), stats.num_preemptions, last.num_preemptions),
                    ((self.prefix_queries.labels(name), vllm.prefix_queries), stats.prefix_cache_queries,
                     last.prefix_cache_queries),
                    ((self.prefix_hits.labels(name), vllm.prefix_hits), stats.prefix_cache_hits,
                     last.prefix_cache_hits),
                    ((self.spec_draft_tokens.labels(name), vllm.spec_draft_tokens), stats.spec_draft_tokens,
                     last.spec_draft_tokens),
                    ((self.spec_accepted_tokens.labels(name), vllm.spec_accepted_tokens), stats.spec_accepted_tokens,
                     last.spec_accepted_tokens)):
                if now > before:
                    for counter in counters:
                        counter.inc(now - before)
            self._last_stats = stats

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
