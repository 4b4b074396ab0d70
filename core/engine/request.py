"""One request the engine serves: its prompt, settings (sampler, EOS ids, stop strings, budget) and
progress, and the events its client drains (core/engine/scheduler.py schedules it, core/engine/engine.py
samples its tokens)."""

from __future__ import annotations

import time

import torch

from .events import GenerationEvent, GenerationResult, Timings
from .spec import GenerationSpec
from .stop_strings import StopStringFilter
from .sampling import Sampler

WAITING, PREFILL, DECODE, FINISHED = "waiting", "prefill", "decode", "finished"


class Request:
    """One sequence: its prompt, settings and progress. Clients read `drain()` for events; the last
    event carries finish_reason and timings."""

    def __init__(self, rid, prompt: list[int], spec: GenerationSpec, eos: frozenset[int], tokenizer,
                 dropped: int, context: int):
        self.id = rid
        self.prompt = prompt
        self.spec = spec
        self.eos = eos
        self.state = WAITING
        self.slot: int | None = None
        self.generated: list[int] = []  # sampled tokens, EOS excluded
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.budget = min(spec.max_new_tokens, context - len(prompt))
        self.sampler = Sampler(spec.sampling)
        self.greedy = spec.sampling.greedy and not spec.sampling.uses_history
        self.timings = Timings(prompt_tokens=len(prompt), truncated_tokens=dropped)
        self.logits: list[torch.Tensor] = []
        self._events: list[GenerationEvent] = []
        self._detok = None
        if tokenizer is not None:
            from llm_torch.core.tokenizer import StreamingDetokenizer

            self._detok = StreamingDetokenizer(tokenizer, skip_special_tokens=True)
        self._stops = StopStringFilter(spec.stop)
        self._text: list[str] = []
        self.arrived = time.perf_counter()
        self.admitted = self.first_token = self.last_token = None

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    @property
    def tokens(self) -> list[int]:
        """Prompt + generated: what the KV slot holds (its length says how much of it)."""
        return self.prompt + self.generated

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.generated)

    def tail(self, start: int, stop: int | None = None) -> list[int]:
        """tokens[start:stop] without building the whole list (the scheduler asks for it every step)."""
        n = len(self.prompt)
        if start >= n:
            return self.generated[start - n : None if stop is None else stop - n]
        return (self.prompt + self.generated)[start:stop] if stop is None or stop > n else self.prompt[start:stop]

    def drain(self) -> list[GenerationEvent]:
        out, self._events = self._events, []
        return out

    def result(self) -> GenerationResult:
        if not self.finished:
            raise RuntimeError("the request has not finished")
        return GenerationResult("".join(self._text), list(self.generated), self.finish_reason, self.timings,
                                error=self.error)

    # -- scheduler side

    def _emit(self, text: str, ids: tuple[int, ...], reason: str | None = None) -> None:
        self._text.append(text)
        self._events.append(GenerationEvent(text, ids, reason, self.timings if reason else None))

    def take(self, token: int, now: float) -> None:
        """A sampled token: text, stops, budget."""
        t = self.timings
        if self.first_token is None:
            self.first_token = now
            t.prefill_seconds = now - self.admitted
            t.queue_seconds = self.admitted - self.arrived
        self.last_token = now
        t.decode_seconds = now - self.first_token
        t.completion_tokens += 1
        if token in self.eos:
            self.finish("stop")
            return
        self.generated.append(token)
        text = self._detok.add_token(token) if self._detok is not None else ""
        text, hit = self._stops.feed(text)
        self._emit(text, (token,))
        if hit:
            self.finish("stop_string")
        elif len(self.generated) >= self.budget:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        """The last event: the detokenizer's and stop filter's held-back text, finish_reason and timings.
        Clients end a request with Engine.cancel, which also frees its slot."""
        tail = ""
        if reason != "stop_string":
            if self._detok is not None:
                tail = self._stops.feed(self._detok.finalize())[0]
            tail += self._stops.flush()
        self.state, self.finish_reason, self.error = FINISHED, reason, error
        self._emit(tail, (), reason)
