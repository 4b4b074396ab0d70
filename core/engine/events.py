"""What generation takes and gives: the spec of a request, its text events, its result and timings, and
the stop-string filter. The engine that produces them is core/engine/engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from llm_torch.core.errors import InputError
from .sampling_spec import SamplingSpec


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 256
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own (config + tokenizer)
    truncate: bool = False  # left-truncate a prompt longer than the context instead of failing
    prefill_chunk: int = 256  # prompt tokens per step of a one-request engine (EngineConfig for the others)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InputError("a stop string cannot be empty")


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


def context_length(model) -> int:
    """The longest context the model supports (config.supported_context: rope scaling included)."""
    from llm_torch.core.model.config import supported_context

    return supported_context(model.config)


def eos_ids_for(model, tokenizer, spec: GenerationSpec) -> frozenset[int]:
    if spec.eos_token_ids is not None:
        return frozenset(spec.eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None:
        ids.update(tokenizer.eos_token_ids)
    return frozenset(ids)


def fit_prompt(prompt_ids: Sequence[int], context: int, spec: GenerationSpec) -> tuple[list[int], int]:
    """Check (or left-truncate) a prompt against the context; -> (ids, dropped count)."""
    ids = list(prompt_ids)
    room = context - 1  # keep room for at least one generated token
    if len(ids) <= room:
        return ids, 0
    if not spec.truncate:
        raise InputError(
            f"prompt is {len(ids)} tokens but the context holds {context} (room for {room} with one generated)",
            hint="shorten the prompt, or allow left truncation (--truncate)",
        )
    return ids[len(ids) - room :], len(ids) - room


class StopStringFilter:
    """Holds back text that could be the start of a stop string; stop strings are never emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
