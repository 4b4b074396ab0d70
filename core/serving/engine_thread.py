"""Runs an Engine's loop for clients on other threads (the HTTP server's event loop).

The engine stays single-threaded: other threads only put commands in an inbox (add, cancel, stop) and
get each request's events through a callback, called on the engine's thread right after the step that
produced them. While nothing is in flight the loop sleeps on a condition, so an idle server costs no CPU.
A failing step (a bug, memory) ends the requests of that step with finish_reason 'error' and the loop
goes on serving.

`run()` runs the loop on the calling thread; `llm serve` calls it on the main thread and puts the HTTP
server on another. Where the native step's OpenMP regions start matters: libgomp throttles its workers'
spinning once more threads manage pools than there are cores, and a second thread's pool (next to the
main thread's, which torch creates) made every region wake sleeping workers: SmolLM2 decode 15 -> 21 ms
per token on 2 cores. `start()` runs it on a new thread (tests, embedding in other programs).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Sequence

from llm_torch.core.engine.engine import Engine
from llm_torch.core.engine.request import Request
from llm_torch.core.errors import LLMError
from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.engine.spec import GenerationSpec

log = logging.getLogger("llm_torch.engine")

OnEvent = Callable[[GenerationEvent], None]


class EngineThread:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: deque = deque()
        self._wake = threading.Condition()
        self._callbacks: dict[Request, OnEvent] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def run(self) -> None:
        """The loop, on this thread, until stop()."""
        self._run()

    # ---- called from other threads ----------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], spec: GenerationSpec, on_event: OnEvent) -> Future:
        """Queue a request; the future gives its Request, or the InputError / QueueFullError add raised."""
        future: Future = Future()
        self._put(("add", list(prompt_ids), spec, on_event, future))
        return future

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        self._put(("cancel", req, reason))

    def cancel_all(self, reason: str = "cancelled") -> None:
        self._put(("cancel_all", reason))

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel what is in flight and end the loop (waiting for it when it runs on its own thread).
        Safe from a signal handler on the loop's own thread: the condition's lock is reentrant."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.engine.slots)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    def _put(self, command) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # ---- the engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self._stopping and not self.engine.has_work():
                    self._wake.wait(1.0)  # a timeout: a signal handler's stop() is seen even if it raced
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            touched = [req for command in commands for req in self._execute(command)]
            if stopping:
                touched += self._cancel_everything("cancelled")
                self._dispatch(touched)
                for command in self._drain_inbox():  # submitted during the stop: refused, not left hanging
                    if command[0] == "add":
                        command[4].set_exception(LLMError("the server is shutting down"))
                return
            try:
                touched += self.engine.step()
            except Exception as e:  # noqa: BLE001 - the loop must outlive one failing step
                log.exception("engine step failed")
                touched += self._fail_running(e)
            self._dispatch(touched)

    def _drain_inbox(self) -> list:
        with self._wake:
            commands = list(self._inbox)
            self._inbox.clear()
        return commands

    def _execute(self, command) -> list[Request]:
        kind = command[0]
        if kind == "add":
            _, ids, spec, on_event, future = command
            if not future.set_running_or_notify_cancel():
                return []
            try:
                req = self.engine.add(ids, spec)
            except LLMError as e:
                future.set_exception(e)
                return []
            self._callbacks[req] = on_event
            future.set_result(req)
            return [req]  # max_new_tokens 0 has already finished
        if kind == "cancel":
            _, req, reason = command
            self.engine.cancel(req, reason)
            return [req]
        if kind == "cancel_all":
            return self._cancel_everything(command[1])
        raise AssertionError(f"unknown command {kind}")

    def _cancel_everything(self, reason: str) -> list[Request]:
        reqs = list(self.engine.waiting) + self.engine.running
        for req in reqs:
            self.engine.cancel(req, reason)
        return reqs

    def _fail_running(self, error: Exception) -> list[Request]:
        reqs = list(self.engine.waiting) + self.engine.running
        message = error.message if isinstance(error, LLMError) else f"internal error: {type(error).__name__}: {error}"
        for req in reqs:
            self.engine.cancel(req, "error", message)
        return reqs

    def _dispatch(self, reqs: list[Request]) -> None:
        for req in dict.fromkeys(reqs):
            callback = self._callbacks.get(req)
            events = req.drain()
            if callback is None:
                continue
            for event in events:
                try:
                    callback(event)
                except Exception:  # noqa: BLE001 - one client's callback must not stop the others
                    log.exception("event callback failed")
            if req.finished:
                self._callbacks.pop(req, None)
