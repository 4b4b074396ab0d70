"""Generation in three layers: a token iterator (prefill, then one step at a time), an event stream
(text pieces with their ids, finish_reason and timings), and `generate()` on top.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import InputError
from .model import KVCache
from .sampling import Sampler, SamplingSpec

@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 256
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own (config + tokenizer)
    truncate: bool = False  # left-truncate a prompt longer than the context instead of failing
    prefill_chunk: int = 512  # bounds the attention matrix a prefill step builds

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InputError("a stop string cannot be empty")


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # from the first generated token to the last
    truncated_tokens: int = 0  # prompt tokens dropped on the left (spec.truncate)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes out of prefill; decode rate counts the steps after it.
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    @property
    def time_to_first_token(self) -> float:
        return self.prefill_seconds

    def to_dict(self) -> dict[str, float]:
        return {
            "prefill_seconds": round(self.prefill_seconds, 6),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 3),
            "decode_seconds": round(self.decode_seconds, 6),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 3),
            "time_to_first_token": round(self.time_to_first_token, 6),
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
    return model.config.max_position_embeddings


def eos_ids_for(model, tokenizer, spec: GenerationSpec) -> frozenset[int]:
    if spec.eos_token_ids is not None:
        return frozenset(spec.eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None:
        ids.update(tokenizer.eos_token_ids)
    return frozenset(ids)


def fit_prompt(prompt_ids: Sequence[int], context: int, cached: int, spec: GenerationSpec) -> tuple[list[int], int]:
    """Check (or left-truncate) a prompt against the context; -> (ids, dropped count)."""
    ids = list(prompt_ids)
    room = context - cached - 1  # keep room for at least one generated token
    if len(ids) <= room:
        return ids, 0
    if not spec.truncate or room <= 0:
        raise InputError(
            f"prompt is {len(ids)} tokens but the context holds {context} ({cached} already used)",
            hint="shorten the prompt, or allow left truncation (--truncate)",
        )
    return ids[len(ids) - room :], len(ids) - room


@torch.inference_mode()
def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    spec: GenerationSpec,
    *,
    eos_ids: frozenset[int] = frozenset(),
    cache: KVCache | None = None,
    timings: Timings | None = None,
    history: Sequence[int] = (),
) -> Iterator[int]:
    """Prefill `prompt_ids` (after what `cache` holds), then yield tokens one at a time.

    Stops after an EOS token (which is yielded) or max_new_tokens; the caller may stop earlier.
    `history`: tokens already in the cache, for the repetition penalty.
    """
    timings = timings if timings is not None else Timings()
    device = next(model.parameters()).device
    context = context_length(model)
    cached = cache.length if cache is not None else 0
    ids, dropped = fit_prompt(prompt_ids, context, cached, spec)
    if not ids:
        raise InputError("the prompt is empty", hint="give some text (or a chat message) to continue")
    timings.prompt_tokens, timings.truncated_tokens = len(ids), dropped
    budget = min(spec.max_new_tokens, context - cached - len(ids))
    need = cached + len(ids) + budget
    if cache is None:
        cache = model.new_cache(1, need)
    elif cache.max_len < need:
        cache.grow(need)
    sampler = Sampler(spec.sampling)
    penalize = spec.sampling.repetition_penalty != 1.0
    seen = torch.tensor([list(history) + ids], dtype=torch.long, device=device) if penalize else None

    if budget <= 0:
        return
    t0 = time.perf_counter()
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    for s in range(0, len(ids), spec.prefill_chunk):
        chunk = prompt[:, s : s + spec.prefill_chunk]
        logits = model(chunk, cache=cache, last_only=True)
    token = int(sampler(logits[:, -1], seen))
    timings.prefill_seconds = time.perf_counter() - t0
    timings.completion_tokens = 1
    t1 = time.perf_counter()
    while True:
        timings.decode_seconds = time.perf_counter() - t1
        yield token
        if token in eos_ids or timings.completion_tokens >= budget:
            return
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        if penalize:
            seen = torch.cat([seen, step], dim=1)
        logits = model(step, cache=cache)
        token = int(sampler(logits[:, -1], seen))
        timings.completion_tokens += 1


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


def stream_generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    spec: GenerationSpec,
    *,
    cache: KVCache | None = None,
    history: Sequence[int] = (),
    timings: Timings | None = None,
) -> Iterator[GenerationEvent]:
    """Text events for one prompt. The last event carries finish_reason and timings.

    EOS tokens are not part of the text or token_ids. Ctrl-C ends the stream with 'interrupted'.
    `timings`: filled as generation goes, so a caller interrupted outside the engine still has them.
    """
    from .tokenizer import StreamingDetokenizer

    timings = timings if timings is not None else Timings()
    detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
    stops = StopStringFilter(spec.stop)
    eos = eos_ids_for(model, tokenizer, spec)
    reason = "length"
    tokens = generate_tokens(model, prompt_ids, spec, eos_ids=eos, cache=cache, timings=timings, history=history)
    try:
        for token in tokens:
            if token in eos:
                reason = "stop"
                break
            text, hit = stops.feed(detok.add_token(token))
            if hit:
                yield GenerationEvent(text, (token,))
                reason = "stop_string"
                break
            yield GenerationEvent(text, (token,))
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        tokens.close()
    tail = "" if reason == "stop_string" else stops.feed(detok.finalize())[0] + stops.flush()
    yield GenerationEvent(tail, (), reason, timings)


def generate(model, tokenizer, prompt_ids: Sequence[int], spec: GenerationSpec, **kw) -> GenerationResult:
    """Run a whole generation; -> text, generated ids (EOS excluded), finish_reason, timings."""
    text, ids = [], []
    for event in stream_generate(model, tokenizer, prompt_ids, spec, **kw):
        text.append(event.text)
        ids.extend(event.token_ids)
        if event.finish_reason:
            return GenerationResult("".join(text), ids, event.finish_reason, event.timings)
    raise AssertionError("stream ended without a final event")


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[Sequence[int]], spec: GenerationSpec) -> list[GenerationResult]:
    """Several prompts at once with left padding; each row equals its one-by-one run (greedy)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    context = context_length(model)
    fitted = [fit_prompt(p, context, 0, spec)[0] for p in prompts]
    if any(not p for p in fitted):
        raise InputError("one of the prompts is empty")
    B, longest = len(fitted), max(len(p) for p in fitted)
    budget = min(spec.max_new_tokens, context - longest)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((B, longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, longest + max(budget, 0)), dtype=torch.long, device=device)
    for i, p in enumerate(fitted):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1  # generated slots are real tokens for every row
    eos = eos_ids_for(model, tokenizer, spec)
    sampler = Sampler(spec.sampling)
    penalize = spec.sampling.repetition_penalty != 1.0
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    timings = [Timings(prompt_tokens=len(p)) for p in fitted]
    if budget <= 0:
        return [GenerationResult("", [], "length", t) for t in timings]
    cache = model.new_cache(B, longest + budget)
    positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, attention_mask=mask[:, :longest], position_ids=positions, last_only=True)
    seen = ids
    t_prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(budget):
        nxt = sampler(logits[:, -1], seen if penalize else None)
        for i, tok in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if tok in eos:
                done[i], reasons[i] = True, "stop"
                continue
            out[i].append(tok)
            if len(out[i]) >= budget:
                done[i] = True
        if all(done):
            break
        pos = positions[:, -1:] + 1
        positions = torch.cat([positions, pos], dim=1)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        kv_len = cache.length + 1
        logits = model(nxt[:, None], cache=cache, attention_mask=mask[:, :kv_len], position_ids=pos)
    t_decode = time.perf_counter() - t1
    results = []
    for i in range(B):
        timings[i].completion_tokens = len(out[i]) + (reasons[i] == "stop")
        timings[i].prefill_seconds, timings[i].decode_seconds = t_prefill, t_decode
        text, n, reason = _apply_stops(tokenizer, out[i], spec.stop, reasons[i])
        results.append(GenerationResult(text, out[i][:n], reason, timings[i]))
    return results


def _apply_stops(tokenizer, ids: list[int], stops: Sequence[str], reason: str) -> tuple[str, int, str]:
    """Cut a finished row at its first stop string, as the streamed path would; -> (text, kept ids, reason)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if not hits:
        return text, len(ids), reason
    cut = min(hits)
    kept = 0  # the ids whose text reaches into the stop string, like the streamed path
    while kept < len(ids) and len(tokenizer.decode(ids[:kept], skip_special_tokens=True)) <= cut:
        kept += 1
    return text[:cut], kept, "stop_string"
