"""vLLM's metric names beside kvserve's own, so dashboards, autoscaler rules and LLM routers written
against vLLM read kvserve unchanged. Same numbers as the kvserve_* metrics; vLLM's types, label names
(`model_name`, plus `engine`: vLLM labels each engine core, kvserve has one) and histogram buckets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.outputs import RequestMetrics

# vLLM's buckets (vllm/v1/metrics/loggers.py), so quantiles and `le` filters agree with vLLM's.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                            120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM declares one series per finish reason; kvserve ends sequences with these three.
FINISHED_REASONS = ("stop", "length", "abort")
_ENGINE = "0"
_MAX_TOKENS_BUCKET = 65536  # vLLM stops at max_model_len, unknown here until the model has loaded


def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: vLLM's token-count buckets."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class VllmMetrics:
    """The vllm:* metrics of one served model, in the registry of service.metrics.ServiceMetrics."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        # Each helper returns the one labelled child: every series shows (at 0) before the first
        # request, as vLLM's do.
        reg, names, labels = registry, ["model_name", "engine"], (model_name, _ENGINE)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=reg).labels(*labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=reg).labels(*labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(*labels)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_accepted_tokens = counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          [*names, "finished_reason"], registry=reg)
        self.success = {reason: success.labels(*labels, reason) for reason in FINISHED_REASONS}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             _ITL_BUCKETS)
        phase = "Histogram of time spent in {} phase for request."
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             _REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", phase.format("WAITING"),
                                    _REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds", phase.format("RUNNING"),
                                        _REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds", phase.format("PREFILL"),
                                      _REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds", phase.format("DECODE"),
                                     _REQUEST_LATENCY_BUCKETS)
        token_buckets = _one_two_five(_MAX_TOKENS_BUCKET)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)

    def observe_state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_finished(self, reason: str) -> None:
        """A sequence ended: stop or length, or abort (vLLM counts aborts here under finished_reason="abort")."""
        counter = self.success.get(reason)
        if counter is not None:
            counter.inc()

    def observe_request(self, prompt_tokens: int, generation_tokens: int, metrics: RequestMetrics | None,
                        e2e_seconds: float) -> None:
        """One finished engine request: token counts and vLLM's phase split of its latency."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        self.e2e.observe(e2e_seconds)
        if metrics is None or metrics.first_scheduled_time is None:
            return  # never scheduled (aborted while queued): no phases to report
        arrival, scheduled = metrics.arrival_time, metrics.first_scheduled_time
        self.queue_time.observe(max(scheduled - arrival, 0.0))
        if metrics.first_token_time is None:
            return
        first, last = metrics.first_token_time, metrics.last_token_time or metrics.first_token_time
        self.ttft.observe(max(first - arrival, 0.0))
        self.prefill_time.observe(max(first - scheduled, 0.0))
        self.decode_time.observe(max(last - first, 0.0))
        self.inference_time.observe(max(last - scheduled, 0.0))
