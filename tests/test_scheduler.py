"""The scheduler (core/engine/scheduler.py) and its KV slots (core/engine/slots.py) alone, without a model or
a runner: who is admitted, what each step feeds (decode rows first, then prompt chunks within the budget),
prefix reuse, cancellation and the queue limit. `step` below does what the engine and its runner do with a
plan: each slot advances by its segment's tokens and every sampled row gets the token 7."""

from __future__ import annotations

import itertools
import time
from collections import deque
from functools import partial

import pytest

from llm_torch.core.engine.request import DECODE, PREFILL, WAITING, Request
from llm_torch.core.engine.scheduler import QueueFullError, Scheduler
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.kv_cache import KVCache
from tests.tiny import LLAMA_BASE

CONFIG = ModelConfig.from_dict(LLAMA_BASE)
CONTEXT = 64
_ids = itertools.count()


def scheduler(max_batch=2, prefill_chunk=8, **kw) -> Scheduler:
    return Scheduler(CONFIG, CONTEXT, partial(KVCache, CONFIG), max_batch=max_batch, prefill_chunk=prefill_chunk, **kw)


def request(prompt, max_new_tokens=4) -> Request:
    spec = GenerationSpec(max_new_tokens=max_new_tokens, eos_token_ids=())
    return Request(next(_ids), list(prompt), spec, frozenset(), None, 0, CONTEXT)


def step(s: Scheduler):
    plan = s.schedule()
    for seg in plan.segments:
        s.kv.cache.lengths[seg.slot] += len(seg.tokens)
    s.update_from_output(plan, [7] * len(plan.sampled), time.perf_counter())
    return plan


def fed(plan) -> list[tuple[Request, int, bool]]:
    """(request, tokens fed, logits wanted) per segment, in batch order."""
    return [(r, len(seg.tokens), seg.logits) for seg, r in zip(plan.segments, plan.requests)]


def test_waiting_requests_take_free_slots_first_come_first_served():
    s = scheduler(max_batch=2)
    a, b, c = request([3, 4, 5], 2), request([6, 7, 8], 5), request([9, 10, 11], 3)
    for r in (a, b, c):
        s.add(r)
    plan = step(s)
    assert plan.changed == [a, b] and (a.slot, b.slot) == (0, 1) and s.kv.requests == [a, b]
    assert list(s.waiting) == [c] and c.state == WAITING and a.state == b.state == DECODE
    step(s)  # a's second token: its budget
    assert a.finish_reason == "length" and s.kv.requests == [None, b]
    plan = step(s)
    assert plan.changed == [c] and c.slot == 0 and not s.waiting
    assert fed(plan) == [(b, 1, True), (c, 3, True)]


def test_decode_rows_first_then_prompt_chunks_within_the_budget():
    s = scheduler(max_batch=3, prefill_chunk=8)
    a = request([3, 4, 5], 10)
    s.add(a)
    step(s)
    b, c = request(range(20, 32)), request(range(40, 45))
    s.add(b)
    s.add(c)
    plan = step(s)
    # Both admitted; the budget (prompt tokens only: a's decode token rides along) all goes to b, the earlier one.
    assert plan.changed == [b, c] and fed(plan) == [(a, 1, True), (b, 8, False)]
    assert c.state == PREFILL and c.slot is not None
    assert fed(step(s)) == [(a, 1, True), (b, 4, True), (c, 4, False)]
    assert fed(step(s)) == [(a, 1, True), (b, 1, True), (c, 1, True)]
    assert len(a.generated) == 4 and len(b.generated) == 2 and len(c.generated) == 1


def test_a_long_prompt_is_prefilled_over_several_steps():
    s = scheduler(max_batch=1, prefill_chunk=8)
    prompt = list(range(3, 23))
    r = request(prompt)
    s.add(r)
    plans = [step(s) for _ in range(3)]
    assert [list(p.segments[0].tokens) for p in plans] == [prompt[:8], prompt[8:16], prompt[16:]]
    assert [p.segments[0].logits for p in plans] == [False, False, True]
    assert all(p.segments[0].rope_len == 20 for p in plans)  # every chunk rotates for the whole prompt
    assert r.generated == [7] and r.state == DECODE
    assert list(step(s).segments[0].tokens) == [7] and s.kv.cache.lengths[r.slot] == 21


def test_a_finished_request_leaves_its_kv_for_the_next_turn():
    s = scheduler(max_batch=2)
    first = request(range(10, 20), 3)
    s.add(first)
    while not first.finished:
        step(s)
    slot = first.slot
    # The last sampled token was never fed: the slot holds the prompt and the answer but that token.
    assert s.kv.kept[slot] == first.tokens[:12] and s.kv.requests == [None, None]
    second = request(first.tokens + [30, 31, 32])
    s.add(second)
    plan = step(s)
    assert second.slot == slot and second.timings.cached_tokens == 12
    assert list(plan.segments[0].tokens) == second.prompt[12:]


def test_a_new_prompt_takes_the_least_recently_used_slot():
    s = scheduler(max_batch=2)
    a, b, c = request([3, 4, 5], 1), request([6, 7, 8], 1), request([9, 10, 11], 1)
    for r in (a, b):
        s.add(r)
        while not r.finished:
            step(s)
    s.add(c)
    step(s)
    assert (a.slot, b.slot, c.slot) == (0, 1, 0) and c.timings.cached_tokens == 0
    assert s.kv.kept == [[9, 10, 11], [6, 7, 8]]  # b's KV is still there for its next turn


def test_a_prefix_held_by_a_busy_slot_is_copied():
    s = scheduler(max_batch=2, prefill_chunk=32)
    system = list(range(10, 30))
    busy = request(system + [40, 41], 20)
    s.add(busy)
    step(s)
    s.kv.cache.keys[0][busy.slot] = 5.0  # what the runner wrote there
    other = request(system + [60, 61, 62])
    s.add(other)
    plan = step(s)
    assert other.slot != busy.slot and other.timings.cached_tokens == len(system)
    assert (s.kv.cache.keys[0][other.slot, :, : len(system)] == 5.0).all()
    assert fed(plan) == [(busy, 1, True), (other, 3, True)] and list(plan.segments[1].tokens) == [60, 61, 62]


def test_prefix_reuse_off_starts_every_prompt_from_nothing():
    s = scheduler(max_batch=1, prefix_reuse=False)
    first = request(range(10, 20), 1)
    s.add(first)
    while not first.finished:
        step(s)
    again = request(first.tokens + [30])
    s.add(again)
    assert fed(step(s)) == [(again, 8, False)] and again.timings.cached_tokens == 0


def test_cancelling_frees_the_slot_at_once():
    s = scheduler(max_batch=1)
    a, b, c = request([3, 4, 5], 10), request([6, 7]), request([8, 9])
    for r in (a, b, c):
        s.add(r)
    step(s)
    s.finish(c, "cancelled")  # a waiting one leaves the queue
    assert list(s.waiting) == [b] and c.finish_reason == "cancelled" and c.drain()[-1].finish_reason == "cancelled"
    s.finish(a, "cancelled")
    assert s.kv.requests == [None] and a.finished and s.kv.kept[0] == a.tokens[:3]
    s.finish(a, "error", "ignored")  # finishing twice changes nothing
    assert a.finish_reason == "cancelled" and a.error is None
    plan = step(s)
    assert plan.changed == [b] and b.slot == 0 and fed(plan) == [(b, 2, True)]


def test_the_queue_limit_counts_the_requests_that_will_not_get_a_slot():
    s = scheduler(max_batch=1, max_queue=1)
    a, b = request([3, 4]), request([5, 6])
    s.add(a)  # gets the free slot at the next step
    s.add(b)  # waits
    with pytest.raises(QueueFullError, match="1 requests already wait for one of 1 slots"):
        s.add(request([7, 8]))
    nothing = request([7, 8], 0)
    s.add(nothing)  # nothing to generate: finished at once, never queued
    assert nothing.finish_reason == "length" and nothing.generated == [] and list(s.waiting) == [a, b]
    step(s)
    with pytest.raises(QueueFullError):
        s.add(request([7, 8]))
    s.finish(a, "cancelled")
    s.add(request([7, 8]))  # a slot is free again: b takes it, the new one waits
    assert len(s.waiting) == 2 and s.has_work()


def test_an_interrupted_step_feeds_its_last_token_again():
    """The runner ran but nothing was sampled (Ctrl-C between them): the next step runs the last token again."""
    s = scheduler(max_batch=1)
    r = request([3, 4, 5, 6])
    s.add(r)
    plan = s.schedule()
    s.kv.cache.lengths[r.slot] += len(plan.segments[0].tokens)
    plan = s.schedule()
    assert [(list(seg.tokens), seg.logits) for seg in plan.segments] == [([6], True)]
    assert s.kv.cache.lengths[r.slot] == 3 and not r.generated


def test_no_work_once_every_request_has_finished():
    s = scheduler(max_batch=2)
    reqs = [request([3, 4], 2), request([5, 6, 7], 3)]
    for r in reqs:
        s.add(r)
    steps = 0
    while s.has_work():
        step(s)
        steps += 1
    assert steps == 3 and [r.generated for r in reqs] == [[7, 7], [7, 7, 7]]
    assert s.schedule().segments == [] and s.waiting == deque()
