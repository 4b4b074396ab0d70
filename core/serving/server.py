"""`llm serve`: an OpenAI-compatible HTTP API (FastAPI) over the engine running on its own thread.

Every request goes to the one engine (core/serving/engine_thread.py), which batches all in-flight requests step by
step and reuses cached prompt prefixes across them (a chat client re-sending the history gets it from the
KV cache). A request's events come back through a per-request asyncio queue, which also receives the client's
disconnect (ASGI's http.disconnect message): a client that leaves, even mid-prefill, has its sequences cancelled at
once (their KV slots are free by the next step). A stream quiet for `sse_keepalive_seconds` (a long prefill, a
wait for a slot) gets an SSE comment, so proxies with idle timeouts keep it open. Bad requests get OpenAI's error
body with a 4xx and nothing else is disturbed; every 4xx / 5xx is counted in /metrics. No printing here: the CLI
prints the startup line, uvicorn logs access.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from . import openai_api as api
from .api_key import ApiKey, checked_api_key
from llm_torch.core.engine.engine import QueueFullError
from .engine_thread import EngineThread
from llm_torch.core.errors import InputError, LLMError, TokenizerError, UnsupportedError
from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.engine.spec import GenerationSpec
from .metrics import Metrics
from llm_torch.core.tokenizer.system_prompt import system_role_supported, with_system

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, liveness probes)
KEEP_ALIVE = object()  # what a stream yields after a quiet spell: written as an SSE comment, which clients ignore


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 2**20
    generation_config: dict[str, Any] = field(default_factory=dict)
    # A stream with nothing to send for this long gets an SSE comment (proxies drop idle connections at ~60 s).
    sse_keepalive_seconds: float = 15.0

    def __post_init__(self):
        self.api_key = checked_api_key(self.api_key)


def _status_of(e: Exception) -> int:
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, (InputError, TokenizerError, UnsupportedError)):
        return 400
    if isinstance(e, LLMError):
        return 503
    return 500


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(api.error_body(message, kind, param, code), status_code=status, headers=headers)


class _Guard:
    """Pure ASGI, outside FastAPI: the API key (constant time) and the body size limit, before any parsing."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.key = ApiKey(settings.api_key) if settings.api_key is not None else None
        self.limit = settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not self.key.matches(token):
                return await _error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                    code="invalid_api_key")(scope, receive, send)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:  # read the body here, so a chunked one is held to the limit too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the client's disconnect, if it comes

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await _error(413, f"request body over {self.limit} bytes", code="request_too_large")(scope, receive, send)


class LoadingGate:
    """Pure ASGI, serving while the model loads: /health answers 503 {"status": "loading"} (as llama.cpp's server
    does, so a supervisor can wait for readiness) and every other path 503 in OpenAI's error shape with
    Retry-After; `open(app)` hands every later request to the real app."""

    def __init__(self):
        self.app = None

    def open(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if self.app is not None:
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            response = JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        else:
            response = _error(503, "the model is still loading", code="model_loading", headers={"Retry-After": "1"})
        await response(scope, receive, send)


def check_fits(prompts: list[list[int]], max_tokens: int | None, context: int) -> None:
    """A prompt plus an explicit max_tokens past the context is refused before it takes a slot (OpenAI's and
    vLLM's 400); without max_tokens the answer runs to the end of the context."""
    if max_tokens is None:
        return
    longest = max((len(ids) for ids in prompts), default=0)
    if longest + max_tokens > context:
        raise api.RequestError(
            f"this model's context is {context} tokens, but the prompt is {longest} tokens and max_tokens asks for "
            f"{max_tokens} more: lower max_tokens to at most {max(context - longest, 0)} or shorten the prompt",
            "max_tokens")


class _CountErrors:
    """Pure ASGI, outermost: counts every error answer (the guard's 401 / 413 included) by endpoint and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.refused(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


class Server:
    def __init__(self, engine: EngineThread, tokenizer, settings: ServeSettings):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = Metrics(engine)
        self.started = int(time.time())
        self.system_role = system_role_supported(tokenizer) if tokenizer.chat_template is not None else False
        self.context = engine.engine.context
        self.waker = _Waker()

    def observe(self, flight: _Flight, event: GenerationEvent, at: float) -> None:
        if event.token_ids:
            self.metrics.generated_tokens.inc(len(event.token_ids))
            if flight.last is None:
                self.metrics.ttft.observe(at - flight.arrived)
            else:
                self.metrics.itl.observe(at - flight.last)
            flight.last = at
        if event.finish_reason:
            self.metrics.request_done(event.finish_reason, event.timings)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise _NotFound(f"the model '{name}' does not exist; this server serves '{self.settings.model_name}'")

    @property
    def model_names(self) -> set[str]:
        name = self.settings.model_name
        return {name, name.rstrip("/").rsplit("/", 1)[-1]}


@dataclass
class _Flight:
    """One request in the engine, as the HTTP side follows it."""

    req: Any  # core.engine.request.Request
    arrived: float
    last: float | None = None  # when its last token came (inter-token latency)


def _gil_holding_write():
    """fd -> write one byte to it without letting go of the GIL (ctypes.PyDLL keeps it, os.write drops it)."""
    try:
        write = ctypes.PyDLL(None).write
    except (OSError, AttributeError):  # no C library symbols in this process (Windows): the plain write
        return lambda fd: os.write(fd, b"\0")
    return lambda fd: write(fd, b"\0", 1)


class _Waker:
    """Wakes the event loop from the engine thread without giving it the GIL.

    call_soon_threadsafe's write releases the GIL, and the woken event-loop thread took it then (the kernel
    runs it at once), so the engine thread waited, between two forwards, for the whole of the stream's work
    (3.7 ms a token on a busy 2-core machine, where the GIL holder is often preempted). Written with the GIL
    held, the wake-up lets the loop run at the engine's next release of the GIL instead."""

    write = staticmethod(_gil_holding_write())

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)  # a full pipe already holds a wake-up
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sleepers: set[_Call] = set()
        weakref.finalize(self, _close_fds, self._read, self._write)

    def sleep(self, call: _Call) -> None:  # event loop: `call` waits for ring()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            loop.add_reader(self._read, self._rung)
        self._sleepers.add(call)

    def rise(self, call: _Call) -> None:  # event loop
        self._sleepers.discard(call)

    def ring(self) -> None:  # engine thread
        try:
            self.write(self._write)
        except BlockingIOError:  # os.write's way of saying the pipe is full
            pass

    def _rung(self) -> None:
        try:
            os.read(self._read, 4096)
        except BlockingIOError:
            pass
        for call in list(self._sleepers):
            if call.inbox:
                call.wake()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _Call:
    """One HTTP request's side of the engine: its engine requests (one per prompt), their events and the client's
    disconnect, all in one inbox, so waiting for the next event notices the client leaving without polling.

    The engine thread appends to the inbox and wakes the event loop (the server's _Waker) only when the stream
    is asleep on it; a stream that finds events waiting takes them with no wake-up, task or timer (what
    asyncio.Queue + wait_for cost per token)."""

    def __init__(self, server: Server, http: HTTPRequest):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.inbox: deque = deque()  # (index, event, perf_counter time) from the engine; None: the client left
        self.flights: list[_Flight] = []
        self.spoke = time.monotonic()  # when the stream last sent something: the keep-alive clock
        self._waiter: asyncio.Future | None = None  # set while the stream sleeps on an empty inbox
        self._watch = asyncio.ensure_future(self._until_disconnect(http.receive))

    async def _until_disconnect(self, receive) -> None:
        # The body is read by now, so the next message is the disconnect (the spec promises nothing else).
        while (await receive())["type"] != "http.disconnect":
            pass
        self.inbox.append(None)
        self.wake()

    def wake(self) -> None:  # event loop
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arrive(self, item) -> None:  # engine thread
        self.inbox.append(item)
        # Appended before the check, and the stream sets _waiter before looking at the inbox again: one of the
        # two sees the other, so no event waits for the keep-alive timer. A spare wake-up only loops once.
        if self._waiter is not None:
            self.server.waker.ring()

    async def submit(self, prompt_ids: list[int], spec: GenerationSpec) -> None:
        """Hand one prompt to the engine; its events carry its index in `flights`."""
        tag, arrive, clock = len(self.flights), self.arrive, time.perf_counter
        arrived = clock()

        def on_event(event: GenerationEvent) -> None:  # engine thread
            arrive((tag, event, clock()))

        self.flights.append(_Flight(await asyncio.wrap_future(self.server.engine.submit(prompt_ids, spec, on_event)),
                                    arrived))

    async def next(self, keepalive: float | None = None):
        """The next (index, event) of this call's requests; None once the client has gone; with `keepalive`,
        KEEP_ALIVE when the stream has sent nothing for that many seconds."""
        inbox = self.inbox
        while not inbox:
            waiter = self._waiter = self.loop.create_future()
            timer = None
            try:
                if inbox:  # arrived between the check and setting _waiter
                    break
                self.server.waker.sleep(self)
                if keepalive is not None:
                    timer = self.loop.call_at(self.loop.time() + max(0.0, self.spoke + keepalive - time.monotonic()),
                                              self.wake)
                await waiter
            finally:
                self._waiter = None
                self.server.waker.rise(self)
                if timer is not None:
                    timer.cancel()
            if not inbox and keepalive is not None and time.monotonic() >= self.spoke + keepalive:
                return KEEP_ALIVE
        got = inbox.popleft()
        if got is None:
            inbox.appendleft(None)  # the client stays gone for later calls too
            return None
        tag, event, at = got
        self.server.observe(self.flights[tag], event, at)
        return tag, event

    def close(self) -> None:
        """Stop watching the client; cancel its requests still running (a no-op for finished ones)."""
        self._watch.cancel()
        for f in self.flights:
            self.server.engine.cancel(f.req)


async def _start(server: Server, http: HTTPRequest, prompts: list[list[int]], spec: GenerationSpec) -> _Call:
    call = _Call(server, http)
    try:
        for ids in prompts:
            await call.submit(ids, spec)
    except BaseException:
        call.close()
        raise
    return call


class _NotFound(Exception):
    pass


def create_app(engine: EngineThread, tokenizer, settings: ServeSettings):
    """The ASGI app: FastAPI inside the guard middleware, inside the error counter."""
    server = Server(engine, tokenizer, settings)
    app = FastAPI(title="llm-torch", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        message = f"{where}: {err.get('msg', 'invalid value')}" if where else err.get("msg", "invalid request")
        return _error(400, message, param=where or None)

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(_NotFound)
    async def _not_found(_request, exc: _NotFound):
        return _error(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(LLMError)
    async def _llm(_request, exc: LLMError):
        status = _status_of(exc)
        headers = {"Retry-After": "1"} if status == 429 else None
        return _error(status, exc.message + (f" ({exc.hint})" if exc.hint else ""), param=getattr(exc, "param", None),
                      headers=headers)

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.check_model(name)
        return _model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, http: HTTPRequest):
        server.check_model(body.model)
        body.check_supported()
        messages = body.template_messages()
        system = [m for m in messages if m["role"] == "system"]
        if system and not server.system_role:  # e.g. Gemma: folded into the first user message
            rest = [m for m in messages if m["role"] != "system"]
            messages = with_system("\n\n".join(m["content"] for m in system), rest, False)
        text = await asyncio.to_thread(tokenizer.apply_chat_template, messages, add_generation_prompt=True)
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_fits([ids], max_tokens, server.context)
        spec = body.spec(settings.generation_config, max_tokens, server.context)
        call = await _start(server, http, [ids], spec)
        rid = api.new_id("chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(call, _chat_stream(server, call, rid, include_usage))
        try:
            return await _chat_whole(server, call, rid)
        finally:
            call.close()

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        body.check_supported()
        prompts = body.prompts()
        spec = body.spec(settings.generation_config, body.max_tokens, server.context)
        ids = [list(p) if isinstance(p, list) else await asyncio.to_thread(tokenizer.encode, p, add_special_tokens=True)
               for p in prompts]
        check_fits(ids, body.max_tokens, server.context)
        call = await _start(server, http, ids, spec)
        echo = [p if body.echo and isinstance(p, str) else "" for p in prompts]
        rid = api.new_id("cmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(call, _completion_stream(server, call, rid, echo, include_usage))
        try:
            return await _completion_whole(server, call, rid, echo)
        finally:
            call.close()

    return _CountErrors(_Guard(app, settings), server.metrics)


def _model_card(server: Server) -> dict[str, Any]:
    return {"id": server.settings.model_name, "object": "model", "created": server.started, "owned_by": "llm-torch",
            "max_model_len": server.context}


def _sse(call: _Call, events: AsyncIterator[Any]) -> StreamingResponse:
    async def encode():
        async for item in events:
            call.spoke = time.monotonic()
            if item is KEEP_ALIVE:
                yield ": keep-alive\n\n"
            else:
                yield f"data: {item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)}\n\n"

    return _EventStream(call, encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _EventStream(StreamingResponse):
    """An SSE response that ends its call however the response ends: finished, client gone, or cancelled before
    its body began (Starlette's disconnect listener can cancel it that early, before a generator's `finally`)."""

    def __init__(self, call: _Call, content, **kw):
        super().__init__(content, **kw)
        self.call = call

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.close()


async def _chat_whole(server: Server, call: _Call, rid):
    pieces = []
    while True:
        got = await call.next()
        if got is None:
            return _error(499, "client closed the request")
        _, event = got
        pieces.append(event.text)
        if event.finish_reason:
            failed = _failure(event, call.flights[0].req)
            if failed is not None:
                return failed
            return api.chat_response(rid, server.settings.model_name, "".join(pieces), event.finish_reason,
                                     event.timings)


async def _chat_stream(server: Server, call: _Call, rid, include_usage):
    name, created = server.settings.model_name, int(time.time())
    keepalive = server.settings.sse_keepalive_seconds
    yield api.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, with_usage=include_usage)
    content = api.chat_content_chunk(rid, name, created, include_usage)
    while True:
        got = await call.next(keepalive)
        if got is None:
            return
        if got is KEEP_ALIVE:
            yield got
            continue
        _, event = got
        if event.text:
            yield content(event.text)
        if event.finish_reason:
            failed = _failure(event, call.flights[0].req)
            if failed is not None:
                yield json.loads(failed.body)
                yield "[DONE]"
                return
            yield api.chat_chunk(rid, name, created, {}, event.finish_reason, with_usage=include_usage)
            if include_usage:
                yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [], "usage": api.usage([event.timings])}
            yield "[DONE]"
            return


async def _completion_whole(server: Server, call: _Call, rid, echo):
    texts = [[e] for e in echo]
    finals: dict[int, GenerationEvent] = {}
    n = len(call.flights)
    while len(finals) < n:
        got = await call.next()
        if got is None:
            return _error(499, "client closed the request")
        i, event = got
        texts[i].append(event.text)
        if event.finish_reason:
            failed = _failure(event, call.flights[i].req)
            if failed is not None:
                return failed
            finals[i] = event
    choices = [api.completion_choice(i, "".join(texts[i]), finals[i].finish_reason) for i in range(n)]
    return api.completion_response(rid, server.settings.model_name, choices, [finals[i].timings for i in range(n)])


async def _completion_stream(server: Server, call: _Call, rid, echo, include_usage):
    name, created = server.settings.model_name, int(time.time())
    keepalive = server.settings.sse_keepalive_seconds
    finals: dict[int, GenerationEvent] = {}
    n = len(call.flights)

    def chunk(choice):
        out = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    for i, e in enumerate(echo):
        if e:
            yield chunk(api.completion_choice(i, e, None))
    while len(finals) < n:
        got = await call.next(keepalive)
        if got is None:
            return
        if got is KEEP_ALIVE:
            yield got
            continue
        i, event = got
        if event.finish_reason:
            failed = _failure(event, call.flights[i].req)
            if failed is not None:
                yield json.loads(failed.body)
                yield "[DONE]"
                return
            finals[i] = event
        if event.text or event.finish_reason:
            yield chunk(api.completion_choice(i, event.text, event.finish_reason))
    if include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
               "usage": api.usage([finals[i].timings for i in range(n)])}
    yield "[DONE]"


def _failure(event: GenerationEvent, req) -> JSONResponse | None:
    """The error response for a request the engine ended without an answer, else None."""
    if event.finish_reason == "error":
        return _error(503, req.error or "generation failed", code="engine_error")
    if event.finish_reason in ("cancelled", "interrupted"):
        return _error(503, "the request was cancelled: the server is shutting down", code="cancelled")
    return None
