"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (no process-global state).

Names follow vLLM's with a ``tidellm:`` prefix so existing dashboards adapt with a rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tidellm.engine.protocol import SchedulerStats
from tidellm.metrics.stats import IterationStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class PrometheusStatLogger:
    """Feeds the registry from scheduler stats (gauges) and per-step front-end stats (counters, histograms)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def counter(name: str, doc: str, extra: list[str] | None = None) -> Counter:
            return Counter(f"tidellm:{name}", doc, labels + (extra or []), registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tidellm:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"tidellm:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.model_name = model_name
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.prefix_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        ).labels(model_name)
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.").labels(
            model_name
        )
        self.preemptions = counter(
            "num_preemptions", "Requests preempted because the KV cache was full."
        ).labels(model_name)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.").labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Tokens generated.").labels(model_name)
        self._finished = counter(
            "request_finished",
            "Requests finished, by finish reason (stop, length, abort, error).",
            ["finished_reason"],
        )
        for reason in ("stop", "length", "abort", "error"):
            self._finished.labels(model_name, reason)  # export zeros so rates work from the start
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds", "Mean time per output token after the first.", _TPOT_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time from arrival to first scheduling.", _LATENCY_BUCKETS
        )
        self.req_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS
        )
        self.req_gen_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS
        )
        # The scheduler reports running totals; counters only move by the difference.
        self._last_totals = (0, 0, 0)

    def record(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        if scheduler_stats is not None:
            s = scheduler_stats
            self.running.set(s.num_running)
            self.waiting.set(s.num_waiting)
            self.kv_usage.set(s.kv_cache_usage)
            totals = (s.prefix_cache_queries, s.prefix_cache_hits, s.num_preemptions)
            for c, new, old in zip(
                (self.prefix_queries, self.prefix_hits, self.preemptions),
                totals,
                self._last_totals,
                strict=True,
            ):
                if new > old:
                    c.inc(new - old)
            self._last_totals = totals
        if iteration.num_prompt_tokens:
            self.prompt_tokens.inc(iteration.num_prompt_tokens)
        if iteration.num_generation_tokens:
            self.generation_tokens.inc(iteration.num_generation_tokens)
        for t in iteration.time_to_first_tokens:
            self.ttft.observe(t)
        for t in iteration.queue_times:
            self.queue_time.observe(t)
        for f in iteration.finished:
            self._finished.labels(self.model_name, f.finish_reason).inc()
            self.e2e.observe(f.e2e_latency)
            self.req_prompt_tokens.observe(f.num_prompt_tokens)
            self.req_gen_tokens.observe(f.num_generation_tokens)
            if f.time_per_output_token is not None:
                self.tpot.observe(f.time_per_output_token)

    def log(self) -> None:
        pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
