"""The generation engine: one scheduler/step loop for any number of sequences (continuous batching).

Every client goes through it: `llm generate`, `llm chat`, `llm run`, `llm bench` and the HTTP server.
`Engine.add` queues a request; each `Engine.step()`:
1. admits waiting requests into free KV slots, each into the slot whose cached tokens share the longest
   prefix with its prompt (prefix reuse: the next turn of a chat, a common system prompt), copying that
   prefix from another slot when one holds more of it;
2. builds one batch: the next token of every decoding sequence, then prompt tokens of prefilling ones,
   at most `prefill_chunk` in all, so a long prompt is prefilled over several steps interleaved with
   the others' decode steps instead of stalling them;
3. runs it through the runner (core/engine/runner.py: on CPU one native call, each weight read once for all);
4. samples each sequence's token with its own sampler (seed, temperature, penalties), applies its
   EOS ids, stop strings and token budget, and queues text events on the request.
A finished or cancelled sequence leaves its slot at once; the slot keeps its KV for prefix reuse until
another request takes it. Each row's logits are bitwise those it gets alone (runner docs), so a seeded
request gives the same tokens whatever else is in the batch.

The engine is single-threaded: one thread calls add/cancel/step (core/serving/engine_thread.py drives it for
the server); core/engine/request.py holds one request's state. Memory: the KV cache holds `max_batch` slots of
up to `max_context` positions (KVCache.bytes_for gives the bound; it grows to it only as requests need).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from llm_torch.core.model.config import resolve_context
from llm_torch.core.errors import InputError, ResourceError
from .events import GenerationEvent, GenerationResult, GenerationSpec, Timings, eos_ids_for, fit_prompt
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import rope_reuse_limit
from .request import DECODE, PREFILL, WAITING, Request
from .runner import Runner, Segment, make_runner



@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # KV slots: sequences in flight at once
    max_context: int | None = None  # positions per slot (None: the model's context)
    prefill_chunk: int = 256  # prompt tokens per step, over all prefilling sequences
    max_queue: int | None = None  # requests waiting for a slot (None: no limit); more -> QueueFullError
    prefix_reuse: bool = True
    keep_logits: bool = False  # keep each sampled row's logits on its request (tests, debugging)

    def __post_init__(self):
        if self.max_batch < 1:
            raise InputError(f"max batch must be >= 1, got {self.max_batch}")
        if self.prefill_chunk < 1:
            raise InputError(f"prefill chunk must be >= 1, got {self.prefill_chunk}")
        if self.max_context is not None and self.max_context < 2:
            raise InputError(f"max context must be >= 2, got {self.max_context}")
        if self.max_queue is not None and self.max_queue < 0:
            raise InputError(f"max queue must be >= 0, got {self.max_queue}")


class QueueFullError(ResourceError):
    """More requests waiting than the engine's max_queue allows."""


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig = EngineConfig(), *, runner: Runner | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.runner = runner if runner is not None else make_runner(model)
        # An explicit max_context past what the rope setup supports is an InputError, not a clamp.
        self.context = resolve_context(model.config, config.max_context)
        self.cache: KVCache | None = None
        n = config.max_batch
        self.slots: list[Request | None] = [None] * n
        self.slot_tokens: list[list[int]] = [[] for _ in range(n)]  # what a free slot's KV holds
        self._slot_used = [0] * n  # last use, for least-recently-used replacement
        self._slot_prompt = [0] * n  # prompt length of the request whose KV a slot holds (dynamic NTK reuse)
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._clock = itertools.count(1)

    @property
    def kv_bytes_limit(self) -> int:
        """The most memory this engine's KV cache can take (max_batch x max_context)."""
        return KVCache.bytes_for(self.model.config, self.config.max_batch, self.context, self.config.prefill_chunk,
                                 torch.finfo(self.runner.dtype).bits // 8)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    # ---- requests ------------------------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int], spec: GenerationSpec) -> Request:
        """Queue a request. Bad input (empty prompt, one longer than the context) raises InputError; a
        full queue raises QueueFullError. max_new_tokens 0 finishes at once ('length', no tokens)."""
        if not prompt_ids:
            raise InputError("the prompt is empty", hint="give some text (or a chat message) to continue")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        ids, dropped = fit_prompt(prompt_ids, self.context, spec)
        queued = len(self.waiting) - self.slots.count(None)  # those that will not get a slot at the next step
        if self.config.max_queue is not None and queued >= self.config.max_queue and spec.max_new_tokens:
            raise QueueFullError(f"{queued} requests already wait for one of {self.config.max_batch} slots",
                                 hint="retry later, or raise the queue limit")
        req = Request(next(self._ids), ids, spec, eos_ids_for(self.model, self.tokenizer, spec), self.tokenizer, dropped,
                      self.context)
        if req.budget <= 0:
            req.admitted = req.arrived
            req._finish("length")
        else:
            self.waiting.append(req)
        return req

    def cancel(self, req: Request, reason: str = "cancelled", error: str | None = None) -> None:
        """Stop a request now: it leaves the queue or frees its slot, and gets its final event
        (finish_reason `reason`; 'error' with the `error` message)."""
        if req.finished:
            return
        if req.state == WAITING:
            self.waiting.remove(req)
        else:
            self._release(req)
        req._finish(reason, error)

    # ---- the step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One scheduler iteration; -> the requests that got events."""
        touched = self._admit()
        touched += self._grow()
        segments, owners = self._schedule()
        if not segments:
            return touched
        logits = self.runner.forward(self.cache, segments)
        now = time.perf_counter()
        rows = [r for s, r in zip(segments, owners) if s.logits]
        for r in owners:
            if r.state == PREFILL and self.cache.lengths[r.slot] >= len(r.prompt):
                r.state = DECODE
        tokens = self._sample(rows, logits)
        for i, (r, tok) in enumerate(zip(rows, tokens)):
            if self.config.keep_logits:
                r.logits.append(logits[i].clone())
            r._take(tok, now)
            if r.finished:
                self._release(r)
        return list(dict.fromkeys(touched + owners))

    def _grow(self) -> list[Request]:
        """Room for this step's tokens (a sequence's tokens so far, the last one fed now); when memory runs
        out, the sequences that need more than the cache holds end with 'error' and the others go on."""
        running = self.running
        if not running:
            return []
        need = min(self.cache.max_len, max(r.length for r in running))
        try:
            self.cache.ensure(need)
            return []
        except ResourceError as e:
            over = [r for r in running if r.length + 1 > self.cache.capacity]
            for r in over:
                self.cancel(r, "error", e.message)
            return over

    def _schedule(self) -> tuple[list[Segment], list[Request]]:
        """Decode rows first (one token each), then prompt chunks within the prefill budget."""
        segments, owners = [], []
        budget = self.config.prefill_chunk
        for r in sorted(self.running, key=lambda r: (r.state != DECODE, r.admitted)):  # then first come, first served
            fed, length = self.cache.lengths[r.slot], r.length
            if fed >= length:
                # An interrupted step fed the last token without sampling from it: feed it again.
                fed = length - 1
                self.cache.truncate_slot(r.slot, fed)
            if r.state == DECODE:
                segments.append(Segment(r.slot, r.tail(fed)))
            else:
                if budget <= 0:
                    continue
                chunk = r.tail(fed, fed + budget)
                budget -= len(chunk)
                segments.append(Segment(r.slot, chunk, logits=fed + len(chunk) == length, rope_len=len(r.prompt)))
            owners.append(r)
        return segments, owners

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        out = [0] * len(rows)
        plain = [i for i, r in enumerate(rows) if r.greedy]
        if plain:
            for i, t in zip(plain, logits[plain].argmax(dim=-1).tolist()):
                out[i] = t
        for i, r in enumerate(rows):
            if not r.greedy:
                s = r.spec.sampling
                context = torch.tensor([r.tokens], device=logits.device) if s.repetition_penalty != 1.0 else None
                gen = None
                if s.frequency_penalty or s.presence_penalty:
                    gen = torch.tensor([r.generated], dtype=torch.long, device=logits.device)
                out[i] = int(r.sampler(logits[i : i + 1], context, gen)[0])
        return out

    # ---- slots ---------------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and None in self.slots:
            req = self.waiting.popleft()
            try:
                self._place(req)
            except ResourceError as e:
                req._finish("error", e.message)
                admitted.append(req)
                continue
            req.state, req.admitted = PREFILL, time.perf_counter()
            admitted.append(req)
        return admitted

    def _place(self, req: Request) -> None:
        """Put req in a free slot, with as much of its prompt's KV as the cache already holds."""
        if self.cache is None:
            self.cache = self.runner.new_cache(self.config.max_batch, self.context,
                                               ring_margin=self.config.prefill_chunk,
                                               initial_len=min(self.context, 64))
        # Room for the prompt now (a request that cannot fit fails alone, here); its answer grows the cache
        # step by step (_grow), so a budget of "the rest of the context" does not reserve it up front.
        self.cache.ensure(len(req.prompt) + 1)
        free = [s for s, r in enumerate(self.slots) if r is None]
        slot = min(free, key=lambda s: self._slot_used[s])  # least recently used
        reuse, source = 0, None
        if self.config.prefix_reuse:
            limit = len(req.prompt) - 1  # the last prompt token must run: its logits give the first token
            held = {s: self.slot_tokens[s] if self.slots[s] is None else self.slots[s].tokens[: self.cache.lengths[s]]
                    for s in range(self.config.max_batch)}
            n = {s: self.cache.reusable(s, min(common_prefix(held[s], req.prompt), limit, self._rope_limit(s, req)))
                 for s in held}
            in_place = max(free, key=lambda s: (n[s], -self._slot_used[s]))
            best = max(held, key=lambda s: n[s])
            if n[in_place] > 0 and n[in_place] >= n[best]:
                slot, reuse = in_place, n[in_place]
            elif n[best] > 0:
                reuse, source = n[best], best  # copied into the least recently used free slot
        if source is not None:
            self.cache.copy_prefix(source, slot, reuse)
        else:
            self.cache.truncate_slot(slot, reuse)
        self.slots[slot], req.slot = req, slot
        self.slot_tokens[slot] = []
        self._slot_prompt[slot] = len(req.prompt)
        self._slot_used[slot] = next(self._clock)
        req.timings.cached_tokens = reuse

    def _rope_limit(self, slot: int, req: Request) -> int:
        """Positions of `slot` whose keys were rotated as req's prompt needs (dynamic NTK: layers.rope_reuse_limit)."""
        limit = rope_reuse_limit(self.model.config, self._slot_prompt[slot], len(req.prompt))
        return len(req.prompt) if limit is None else limit

    def _release(self, req: Request) -> None:
        s = req.slot
        if s is None or self.slots[s] is not req:
            return
        self.slot_tokens[s] = req.tokens[: self.cache.lengths[s]]
        self.slots[s] = None
        self._slot_used[s] = next(self._clock)

    # ---- convenience for synchronous clients ----------------------------------------------------------

    def stream(self, prompt_ids: Sequence[int], spec: GenerationSpec) -> Iterator[GenerationEvent]:
        """Add one request and step until it finishes (others in flight progress too)."""
        return self.follow(self.add(prompt_ids, spec))

    def follow(self, req: Request) -> Iterator[GenerationEvent]:
        """req's events, stepping the engine until it finishes. Ctrl-C ends it with 'interrupted';
        closing the iterator cancels it."""
        try:
            while True:
                for event in req.drain():
                    yield event
                    if event.finish_reason:
                        return
                self.step()
        except KeyboardInterrupt:
            self.cancel(req, "interrupted")
            yield from req.drain()
        finally:
            self.cancel(req)

    def run(self, requests: Iterable[tuple[Sequence[int], GenerationSpec]]) -> Iterator[GenerationResult]:
        """Results of many requests, in input order, with up to max_batch in flight (inputs are read lazily).
        A bad request gets a result with finish_reason 'error' and its message; the others run normally."""
        pending: deque[Request | GenerationResult] = deque()
        source = iter(requests)
        exhausted = False
        try:
            while True:
                while not exhausted and len(self.waiting) + len(self.running) < self.config.max_batch:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                        break
                    try:
                        pending.append(self.add(*item))
                    except InputError as e:
                        pending.append(GenerationResult("", [], "error", Timings(), error=e.message))
                while pending and (isinstance(pending[0], GenerationResult) or pending[0].finished):
                    head = pending.popleft()
                    yield head if isinstance(head, GenerationResult) else head.result()
                if exhausted and not pending:
                    return
                self.step()
        finally:
            for r in pending:
                if isinstance(r, Request):
                    self.cancel(r)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- one-shot helpers (a fresh single-slot engine per call) ------------------------------------------------


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], spec: GenerationSpec, *,
                    runner: Runner | None = None, context: int | None = None) -> Iterator[GenerationEvent]:
    """Text events for one prompt; the last carries finish_reason and timings. context: KV positions
    (prompt + answer; None: the model's)."""
    config = EngineConfig(max_batch=1, max_context=context, prefill_chunk=spec.prefill_chunk)
    engine = Engine(model, tokenizer, config, runner=runner)
    yield from engine.stream(prompt_ids, spec)


def generate(model, tokenizer, prompt_ids: Sequence[int], spec: GenerationSpec, **kw) -> GenerationResult:
    """Run one whole generation; -> text, generated ids (EOS excluded), finish_reason, timings."""
    text, ids = [], []
    for event in stream_generate(model, tokenizer, prompt_ids, spec, **kw):
        text.append(event.text)
        ids.extend(event.token_ids)
        if event.finish_reason:
            return GenerationResult("".join(text), ids, event.finish_reason, event.timings)
    raise AssertionError("stream ended without a final event")
