"""The KV cache's slots: which request holds each one, what a free one's KV still holds, and which slot a new
request takes (prefix reuse: the next turn of a chat, a common system prompt).

A request goes to the free slot whose cached tokens share the longest prefix with its prompt, or has that
prefix copied from another slot when one (busy or free) holds more of it; otherwise it takes the least
recently used free slot. A slot keeps its KV after its request ends, until another request takes it.
Nothing here runs the model: the cache's tensors are only copied (copy_prefix) or rolled back (truncate_slot).
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import rope_reuse_limit
from .request import Request


class KVSlots:
    def __init__(self, model_config: ModelConfig, n_slots: int, context: int, new_cache: Callable[..., KVCache], *,
                 ring_margin: int, prefix_reuse: bool = True):
        """new_cache(n_slots, max_len, ring_margin=, initial_len=) makes the cache at the first request (the
        runner's, so it lives where the model computes); ring_margin: the most positions one step writes to a slot."""
        self.model_config = model_config
        self.n_slots = n_slots
        self.context = context
        self.new_cache = new_cache
        self.ring_margin = ring_margin
        self.prefix_reuse = prefix_reuse
        self.cache: KVCache | None = None
        self.requests: list[Request | None] = [None] * n_slots  # who holds each slot
        self.kept: list[list[int]] = [[] for _ in range(n_slots)]  # what a free slot's KV holds
        self._used = [0] * n_slots  # last use, for least-recently-used replacement
        self._prompt_len = [0] * n_slots  # prompt length of the request whose KV a slot holds (dynamic NTK reuse)
        self._clock = itertools.count(1)

    @property
    def running(self) -> list[Request]:
        return [r for r in self.requests if r is not None]

    @property
    def free(self) -> int:
        return self.requests.count(None)

    def allocate(self, req: Request) -> None:
        """Put req in a free slot, with as much of its prompt's KV as the cache already holds
        (req.timings.cached_tokens). No room for its prompt raises ResourceError and changes nothing."""
        if self.cache is None:
            self.cache = self.new_cache(self.n_slots, self.context, ring_margin=self.ring_margin,
                                        initial_len=min(self.context, 64))
        # Room for the prompt now (a request that cannot fit fails alone, here); its answer grows the cache
        # step by step (Scheduler.schedule), so a budget of "the rest of the context" does not reserve it up front.
        self.cache.ensure(len(req.prompt) + 1)
        free = [s for s, r in enumerate(self.requests) if r is None]
        slot = min(free, key=lambda s: self._used[s])  # least recently used
        reuse, source = 0, None
        if self.prefix_reuse:
            limit = len(req.prompt) - 1  # the last prompt token must run: its logits give the first token
            held = {s: self.kept[s] if r is None else r.tokens[: self.cache.lengths[s]] for s, r in enumerate(self.requests)}
            n = {s: self.cache.reusable(s, min(common_prefix(held[s], req.prompt), limit, self._rope_limit(s, req)))
                 for s in held}
            in_place = max(free, key=lambda s: (n[s], -self._used[s]))
            best = max(held, key=lambda s: n[s])
            if n[in_place] > 0 and n[in_place] >= n[best]:
                slot, reuse = in_place, n[in_place]
            elif n[best] > 0:
                reuse, source = n[best], best  # copied into the least recently used free slot
        if source is not None:
            self.cache.copy_prefix(source, slot, reuse)
        else:
            self.cache.truncate_slot(slot, reuse)
        self.requests[slot], req.slot = req, slot
        self.kept[slot] = []
        self._prompt_len[slot] = len(req.prompt)
        self._used[slot] = next(self._clock)
        req.timings.cached_tokens = reuse

    def release(self, req: Request) -> None:
        """req leaves its slot (if it holds one); the slot keeps req's KV for prefix reuse."""
        s = req.slot
        if s is None or self.requests[s] is not req:
            return
        self.kept[s] = req.tokens[: self.cache.lengths[s]]
        self.requests[s] = None
        self._used[s] = next(self._clock)

    def _rope_limit(self, slot: int, req: Request) -> int:
        """Positions of `slot` whose keys were rotated as req's prompt needs (dynamic NTK: layers.rope_reuse_limit)."""
        limit = rope_reuse_limit(self.model_config, self._prompt_len[slot], len(req.prompt))
        return len(req.prompt) if limit is None else limit


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
