"""What `llm serve` counts (GET /metrics), through prometheus_client.

Each app has its own CollectorRegistry, never the process-wide default one: two servers in one process (tests,
a program embedding the app) keep separate counts and do not collide on metric names. Counters are named
without `_total`; prometheus_client adds it (`llm_generation_tokens` is exposed as `llm_generation_tokens_total`).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine_thread import EngineThread
from llm_torch.core.engine.events import Timings

# Label values for the endpoint a failed request hit: the routes' templates, so a client probing random paths
# adds one series ("other"), not one per path.
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class Metrics:
    """The server's counters, gauges and latency histograms, in a registry of their own."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: EngineThread):
        self.registry = r = CollectorRegistry()
        # Gauges read the engine when scraped: nothing to keep in step.
        Gauge("llm_requests_running", "Requests decoding or prefilling now.", registry=r).set_function(
            lambda: engine.running)
        Gauge("llm_requests_waiting", "Requests waiting for a KV slot.", registry=r).set_function(
            lambda: engine.waiting)
        self.finished = Counter("llm_requests_finished", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("llm_requests_rejected", "Requests answered with an HTTP error (4xx / 5xx), "
                                "by endpoint and status.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.cached_tokens = Counter("llm_prompt_tokens_cached", "Prompt tokens served from the prefix cache.",
                                     registry=r)
        self.generated_tokens = Counter("llm_generation_tokens", "Tokens generated.", registry=r)
        Gauge("llm_kv_cache_bytes", "Memory the KV cache holds now.", registry=r).set_function(
            lambda: engine.engine.cache.nbytes if engine.engine.cache is not None else 0)
        Gauge("llm_kv_cache_limit_bytes", "The most the KV cache may grow to (max batch x context).",
              registry=r).set_function(lambda: engine.engine.kv_bytes_limit)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=self.TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llm_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=self.ITL_BUCKETS, registry=r)

    def request_done(self, reason: str, timings: Timings | None) -> None:
        self.finished.labels(finish_reason=reason).inc()
        if timings is not None:
            self.prompt_tokens.inc(timings.prompt_tokens)
            self.cached_tokens.inc(timings.cached_tokens)

    def refused(self, path: str, status: int) -> None:
        """An HTTP error answer (any 4xx / 5xx: auth, validation, unknown model, queue full, engine failure)."""
        self.rejected.labels(endpoint=endpoint_of(path), status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
