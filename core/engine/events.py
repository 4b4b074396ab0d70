"""What generation gives: a request's text events, its result and its timings. The engine that produces them
is core/engine/engine.py; what a request asks for is core/engine/spec.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0  # from taking a KV slot to the first token
    decode_seconds: float = 0.0  # from the first generated token to the last
    truncated_tokens: int = 0  # prompt tokens dropped on the left (spec.truncate)
    cached_tokens: int = 0  # prompt tokens whose KV was already cached (prefix reuse): not computed again
    queue_seconds: float = 0.0  # waiting for a free slot

    @property
    def prefill_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes out of prefill; decode rate counts the steps after it.
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.queue_seconds + self.prefill_seconds

    def to_dict(self) -> dict[str, float]:
        return {
            "prefill_seconds": round(self.prefill_seconds, 6),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 3),
            "decode_seconds": round(self.decode_seconds, 6),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            "time_to_first_token": round(self.time_to_first_token, 6),
            "cached_prompt_tokens": self.cached_tokens,
        }


@dataclass(frozen=True)
class GenerationEvent:
    text: str  # new text since the last event (may be "" while a character or stop string is pending)
    token_ids: tuple[int, ...]  # tokens this event accounts for
    finish_reason: str | None = None  # set on the last event only
    timings: Timings | None = None  # set on the last event only


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    timings: Timings
    error: str | None = None  # finish_reason 'error': what was wrong with this request

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract of `llm generate --format json` (documented in the README)."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.timings.prompt_tokens,
                "completion_tokens": self.timings.completion_tokens,
                "total_tokens": self.timings.prompt_tokens + self.timings.completion_tokens,
            },
            "timings": self.timings.to_dict(),
        }
