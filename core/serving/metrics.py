"""What `llm serve` counts, in Prometheus' text format (GET /metrics). Updated on the event loop's thread only."""

from __future__ import annotations

from typing import Any

from .engine_thread import EngineThread
from llm_torch.core.engine.events import Timings


class Metrics:
    """Prometheus text exposition of what the server did (updated on the event loop thread only)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)

    def __init__(self):
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.cached_tokens = self.generated_tokens = 0
        self.rejected: dict[int, int] = {}
        self.ttft = _Histogram(self.TTFT_BUCKETS)
        self.itl = _Histogram(self.ITL_BUCKETS)

    def request_done(self, reason: str, timings: Timings | None) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if timings is not None:
            self.prompt_tokens += timings.prompt_tokens
            self.cached_tokens += timings.cached_tokens

    def render(self, engine: EngineThread) -> str:
        lines = [
            *_metric("llm_requests_running", "gauge", "Requests decoding or prefilling now.", [("", engine.running)]),
            *_metric("llm_requests_waiting", "gauge", "Requests waiting for a KV slot.", [("", engine.waiting)]),
            *_metric("llm_requests_finished_total", "counter", "Finished requests by finish reason.",
                     [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(self.finished.items())]),
            *_metric("llm_requests_rejected_total", "counter", "Requests refused before generation, by HTTP status.",
                     [(f'{{status="{k}"}}', v) for k, v in sorted(self.rejected.items())]),
            *_metric("llm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", self.prompt_tokens)]),
            *_metric("llm_prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache.",
                     [("", self.cached_tokens)]),
            *_metric("llm_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)]),
            *_metric("llm_kv_cache_bytes", "gauge", "Memory the KV cache holds now.",
                     [("", engine.engine.cache.nbytes if engine.engine.cache is not None else 0)]),
            *_metric("llm_kv_cache_limit_bytes", "gauge", "The most the KV cache may grow to (max batch x context).",
                     [("", engine.engine.kv_bytes_limit)]),
            *self.ttft.render("llm_time_to_first_token_seconds", "Time from request to first token."),
            *self.itl.render("llm_inter_token_latency_seconds", "Time between consecutive tokens of a request."),
        ]
        return "\n".join(lines) + "\n"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        rows = [(f'_bucket{{le="{edge}"}}', n) for edge, n in zip(self.buckets, self.counts)]
        rows += [('_bucket{le="+Inf"}', self.count), ("_sum", round(self.sum, 6)), ("_count", self.count)]
        return [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"] + [f"{name}{k} {v}" for k, v in rows]


def _metric(name: str, kind: str, help_text: str, rows: list[tuple[str, Any]]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"] + [f"{name}{labels} {value}" for labels, value in rows]
