"""The generation engine: the client API over one step loop for any number of sequences (continuous batching).

Every client goes through it: `llm generate`, `llm chat`, `llm run`, `llm bench` and the HTTP server.
`Engine.add` queues a request; each `Engine.step()`:
1. asks the scheduler (core/engine/scheduler.py) for this step's plan: which requests take KV slots (prefix
   reuse, core/engine/slots.py), which decode and which prompt chunks prefill within `prefill_chunk`;
2. runs it through the runner (core/engine/runner.py: on CPU one native call, each weight read once for all);
3. samples each sequence's token with its own sampler (seed, temperature, penalties) and hands the tokens
   back to the scheduler, which applies each request's EOS ids, stop strings and token budget
   (core/engine/request.py queues the text events) and frees the slots of those that finished.
A finished or cancelled sequence leaves its slot at once; the slot keeps its KV for prefix reuse until
another request takes it. Each row's logits are bitwise those it gets alone (runner docs), so a seeded
request gives the same tokens whatever else is in the batch.

The engine is single-threaded: one thread calls add/cancel/step (core/serving/engine_thread.py drives it for
the server). Memory: the KV cache holds `max_batch` slots of up to `max_context` positions
(KVCache.bytes_for gives the bound; it grows to it only as requests need).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from llm_torch.core.errors import InputError
from llm_torch.core.model.config import resolve_context
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.phases import mark
from .events import GenerationEvent, GenerationResult, Timings
from .request import Request
from .runner import Runner, make_runner
from .scheduler import QueueFullError, Scheduler  # QueueFullError: what add raises, importable from here
from .spec import GenerationSpec, eos_ids_for, fit_prompt


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


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig = EngineConfig(), *, runner: Runner | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.runner = runner if runner is not None else make_runner(model)
        # An explicit max_context past what the rope setup supports is an InputError, not a clamp.
        self.context = resolve_context(model.config, config.max_context)
        self.scheduler = Scheduler(model.config, self.context, self.runner.new_cache, max_batch=config.max_batch,
                                   prefill_chunk=config.prefill_chunk, max_queue=config.max_queue,
                                   prefix_reuse=config.prefix_reuse)
        self._ids = itertools.count()

    @property
    def kv_bytes_limit(self) -> int:
        """The most memory this engine's KV cache can take (max_batch x max_context)."""
        return KVCache.bytes_for(self.model.config, self.config.max_batch, self.context, self.config.prefill_chunk,
                                 self.model.kv_format())

    @property
    def cache(self) -> KVCache | None:
        """The KV cache (None until the first request takes a slot)."""
        return self.scheduler.kv.cache

    @property
    def slots(self) -> list[Request | None]:
        """The request in each KV slot (None: free)."""
        return self.scheduler.kv.requests

    @property
    def slot_tokens(self) -> list[list[int]]:
        """What each free slot's KV still holds (prefix reuse)."""
        return self.scheduler.kv.kept

    @property
    def waiting(self) -> deque[Request]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.kv.running

    def has_work(self) -> bool:
        return self.scheduler.has_work()

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
        req = Request(next(self._ids), ids, spec, eos_ids_for(self.model, self.tokenizer, spec), self.tokenizer, dropped,
                      self.context)
        self.scheduler.add(req)
        return req

    def cancel(self, req: Request, reason: str = "cancelled", error: str | None = None) -> None:
        """Stop a request now: it leaves the queue or frees its slot, and gets its final event
        (finish_reason `reason`; 'error' with the `error` message)."""
        self.scheduler.finish(req, reason, error)

    # ---- the step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One scheduler iteration; -> the requests that got events."""
        plan = self.scheduler.schedule()
        if not plan.segments:
            return plan.changed
        logits = self.runner.forward(self.cache, plan.segments)
        mark("forward")
        now = time.perf_counter()
        rows = plan.sampled
        tokens = self._sample(rows, logits)
        if self.config.keep_logits:
            for r, row in zip(rows, logits):
                r.logits.append(row.clone())
        self.scheduler.update_from_output(plan, tokens, now)
        return list(dict.fromkeys(plan.changed + plan.requests))

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


# ---- one-shot helpers (a fresh single-slot engine per call) ------------------------------------------------


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], spec: GenerationSpec, *,
                    runner: Runner | None = None, context: int | None = None) -> Iterator[GenerationEvent]:
    """Text events for one prompt; the last carries finish_reason and timings. context: KV positions
    (prompt + answer; None: the model's)."""
    config = EngineConfig(max_batch=1, max_context=context, prefill_chunk=spec.prefill_chunk)
    engine = Engine(model, tokenizer, config, runner=runner)
    mark("engine + runner")
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
