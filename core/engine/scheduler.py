"""Who runs at each step. `schedule()` returns a plain plan (SchedulerOutput); the engine runs it, samples, and
hands the tokens back with `update_from_output`. Nothing here runs the model, so it is tested alone
(tests/test_scheduler.py).

Each step:
1. waiting requests take free KV slots, first come first served (core/engine/slots.py: prefix reuse);
2. the cache grows to hold every running sequence's next token; when memory runs out, the sequences that
   need more than it holds end with 'error' and the others go on;
3. the plan: the next token of every decoding sequence, then prompt tokens of prefilling ones (earliest
   admitted first), at most `prefill_chunk` in all, so a long prompt is prefilled over several steps
   interleaved with the others' decode steps instead of stalling them.
A request's progress is what its slot holds (cache.lengths, advanced by the runner), so a step interrupted
between the forward and the sampling feeds its last token again.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from llm_torch.core.errors import ResourceError
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.kv_cache import KVCache
from .request import DECODE, PREFILL, WAITING, Request
from .runner import Segment
from .slots import KVSlots


class QueueFullError(ResourceError):
    """More requests waiting than the engine's max_queue allows."""


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan: segments[i] continues requests[i]. `changed`: requests admitted, or ended by the
    scheduler, this step (they have news even when nothing runs)."""

    segments: list[Segment]
    requests: list[Request]
    changed: list[Request]

    @property
    def sampled(self) -> list[Request]:
        """The requests whose logits the step returns, in the logits' order."""
        return [r for s, r in zip(self.segments, self.requests) if s.logits]


class Scheduler:
    def __init__(self, model_config: ModelConfig, context: int, new_cache: Callable[..., KVCache], *, max_batch: int,
                 prefill_chunk: int, max_queue: int | None = None, prefix_reuse: bool = True):
        """context: positions per slot; prefill_chunk: prompt tokens per step, over all prefilling sequences;
        max_queue: requests that may wait for a slot (None: no limit)."""
        # A step writes at most prefill_chunk positions of a slot: the margin its sliding-window rings need.
        self.kv = KVSlots(model_config, max_batch, context, new_cache, ring_margin=prefill_chunk,
                          prefix_reuse=prefix_reuse)
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.waiting: deque[Request] = deque()

    def has_work(self) -> bool:
        return bool(self.waiting) or self.kv.free < self.kv.n_slots

    def add(self, req: Request) -> None:
        """Queue req; one with nothing to generate finishes at once ('length', no tokens). QueueFullError when
        max_queue requests already wait beyond the slots free now."""
        if req.budget <= 0:
            req.admitted = req.arrived
            req.finish("length")
            return
        queued = len(self.waiting) - self.kv.free  # those that will not get a slot at the next step
        if self.max_queue is not None and queued >= self.max_queue:
            raise QueueFullError(f"{queued} requests already wait for one of {self.kv.n_slots} slots",
                                 hint="retry later, or raise the queue limit")
        self.waiting.append(req)

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End req now: it leaves the queue or frees its slot, and gets its final event."""
        if req.finished:
            return
        if req.state == WAITING:
            self.waiting.remove(req)
        else:
            self.kv.release(req)
        req.finish(reason, error)

    def schedule(self) -> SchedulerOutput:
        """This step's plan: decode rows first (one token each), then prompt chunks within prefill_chunk."""
        changed = self._admit() + self._grow()
        cache = self.kv.cache
        segments, requests = [], []
        budget = self.prefill_chunk
        for r in sorted(self.kv.running, key=lambda r: (r.state != DECODE, r.admitted)):  # then first come, first served
            fed, length = cache.lengths[r.slot], r.length
            if fed >= length:
                # An interrupted step fed the last token without sampling from it: feed it again.
                fed = length - 1
                cache.truncate_slot(r.slot, fed)
            if r.state == DECODE:
                segments.append(Segment(r.slot, r.tail(fed)))
            else:
                if budget <= 0:
                    continue
                chunk = r.tail(fed, fed + budget)
                budget -= len(chunk)
                segments.append(Segment(r.slot, chunk, logits=fed + len(chunk) == length, rope_len=len(r.prompt)))
            requests.append(r)
        return SchedulerOutput(segments, requests, changed)

    def update_from_output(self, output: SchedulerOutput, tokens: list[int], now: float) -> None:
        """What the runner and the sampler made of `output`: tokens[i] is output.sampled[i]'s, sampled at `now`
        (the runner has advanced each slot's length). Finished requests leave their slots."""
        lengths = self.kv.cache.lengths
        for r in output.requests:
            if r.state == PREFILL and lengths[r.slot] >= len(r.prompt):
                r.state = DECODE
        for r, token in zip(output.sampled, tokens):
            r.take(token, now)
            if r.finished:
                self.kv.release(r)

    def _admit(self) -> list[Request]:
        admitted = []
        while self.waiting and self.kv.free:
            req = self.waiting.popleft()
            try:
                self.kv.allocate(req)
            except ResourceError as e:
                req.finish("error", e.message)
                admitted.append(req)
                continue
            req.state, req.admitted = PREFILL, time.perf_counter()
            admitted.append(req)
        return admitted

    def _grow(self) -> list[Request]:
        """Room for this step's tokens (a sequence's tokens so far, the last one fed now)."""
        running = self.kv.running
        if not running:
            return []
        cache = self.kv.cache
        try:
            cache.ensure(min(cache.max_len, max(r.length for r in running)))
            return []
        except ResourceError as e:
            over = [r for r in running if r.length + 1 > cache.capacity]
            for r in over:
                self.finish(r, "error", e.message)
            return over
