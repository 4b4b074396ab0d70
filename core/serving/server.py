"""`llm serve`: an OpenAI-compatible HTTP API (FastAPI) over the engine running on its own thread.

Every request goes to the one engine (core/serving/engine_thread.py), which batches all in-flight requests step by
step and reuses cached prompt prefixes across them (a chat client re-sending the history gets it from the
KV cache). A request's events come back through a per-request asyncio queue. A client that disconnects has
its sequence cancelled (its KV slot is free by the next step); bad requests get OpenAI's error body with a
4xx and nothing else is disturbed. No printing here: the CLI prints the startup line, uvicorn logs access.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from . import openai_api as api
from llm_torch.core.engine.engine import QueueFullError
from .engine_thread import EngineThread
from llm_torch.core.errors import InputError, LLMError, TokenizerError, UnsupportedError
from llm_torch.core.engine.events import GenerationEvent
from llm_torch.core.engine.spec import GenerationSpec
from .metrics import Metrics
from llm_torch.core.tokenizer.system_prompt import system_role_supported, with_system

OPEN_PATHS = ("/health",)  # answered without the API key (load balancers, liveness probes)
DISCONNECT_POLL_SECONDS = 0.5


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 2**20
    generation_config: dict[str, Any] = field(default_factory=dict)


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
    """Pure ASGI, outermost: the API key (constant time) and the body size limit, before any parsing."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.key = hashlib.sha256(settings.api_key.encode()).digest() if settings.api_key else None
        self.limit = settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # Hash both sides first: compare_digest is constant-time for equal lengths only.
            if not hmac.compare_digest(hashlib.sha256(token).digest(), self.key):
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


class Server:
    def __init__(self, engine: EngineThread, tokenizer, settings: ServeSettings):
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = Metrics()
        self.started = int(time.time())
        self.system_role = system_role_supported(tokenizer) if tokenizer.chat_template is not None else False
        self.context = engine.engine.context

    # ---- running one request -------------------------------------------------------------------------

    async def submit(self, prompt_ids: list[int], spec: GenerationSpec, queue: asyncio.Queue, tag: Any = None) -> _Flight:
        """Hand a request to the engine; its events arrive on `queue` as (tag, event, time)."""
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()

        def on_event(event: GenerationEvent) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (tag, event, time.perf_counter()))

        return _Flight(await asyncio.wrap_future(self.engine.submit(prompt_ids, spec, on_event)), arrived)

    def observe(self, flight: _Flight, event: GenerationEvent, at: float) -> None:
        if event.token_ids:
            self.metrics.generated_tokens += len(event.token_ids)
            if flight.last is None:
                self.metrics.ttft.observe(at - flight.arrived)
            else:
                self.metrics.itl.observe(at - flight.last)
            flight.last = at
        if event.finish_reason:
            self.metrics.request_done(event.finish_reason, event.timings)

    async def next_event(self, queue: asyncio.Queue, http: HTTPRequest):
        """The next (tag, event, time), or None once the client has gone."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return None

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


class _NotFound(Exception):
    pass


def create_app(engine: EngineThread, tokenizer, settings: ServeSettings):
    """The ASGI app (FastAPI inside the guard middleware)."""
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
        server.metrics.rejected[status] = server.metrics.rejected.get(status, 0) + 1
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
        return PlainTextResponse(server.metrics.render(engine), media_type="text/plain; version=0.0.4")

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
        spec = body.spec(settings.generation_config, max_tokens, server.context)
        queue: asyncio.Queue = asyncio.Queue()
        flight = await server.submit(ids, spec, queue)
        rid = api.new_id("chatcmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(_chat_stream(server, http, queue, flight, rid, include_usage))
        return await _chat_whole(server, http, queue, flight, rid)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        body.check_supported()
        prompts = body.prompts()
        spec = body.spec(settings.generation_config, body.max_tokens, server.context)
        queue: asyncio.Queue = asyncio.Queue()
        flights = []
        try:
            for i, p in enumerate(prompts):
                ids = p if isinstance(p, list) else await asyncio.to_thread(tokenizer.encode, p, add_special_tokens=True)
                flights.append(await server.submit(list(ids), spec, queue, tag=i))
        except BaseException:
            for f in flights:
                engine.cancel(f.req)
            raise
        echo = [p if body.echo and isinstance(p, str) else "" for p in prompts]
        rid = api.new_id("cmpl")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _sse(_completion_stream(server, http, queue, flights, rid, echo, include_usage))
        return await _completion_whole(server, http, queue, flights, rid, echo)

    return _Guard(app, settings)


def _model_card(server: Server) -> dict[str, Any]:
    return {"id": server.settings.model_name, "object": "model", "created": server.started, "owned_by": "llm-torch",
            "max_model_len": server.context}


def _sse(events: AsyncIterator[dict | str]) -> StreamingResponse:
    async def encode():
        async for item in events:
            yield f"data: {item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)}\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_whole(server: Server, http, queue, flight: _Flight, rid):
    pieces = []
    try:
        while True:
            got = await server.next_event(queue, http)
            if got is None:
                return _error(499, "client closed the request")
            _, event, at = got
            server.observe(flight, event, at)
            pieces.append(event.text)
            if event.finish_reason:
                failed = _failure(event, flight.req)
                if failed is not None:
                    return failed
                return api.chat_response(rid, server.settings.model_name, "".join(pieces), event.finish_reason,
                                         event.timings)
    finally:
        server.engine.cancel(flight.req)  # a no-op once finished; frees the slot of an abandoned request


async def _chat_stream(server: Server, http, queue, flight: _Flight, rid, include_usage):
    name, created = server.settings.model_name, int(time.time())
    try:
        yield api.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, with_usage=include_usage)
        while True:
            got = await server.next_event(queue, http)
            if got is None:
                return
            _, event, at = got
            server.observe(flight, event, at)
            if event.text:
                yield api.chat_chunk(rid, name, created, {"content": event.text}, with_usage=include_usage)
            if event.finish_reason:
                failed = _failure(event, flight.req)
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
    finally:
        server.engine.cancel(flight.req)


async def _completion_whole(server: Server, http, queue, flights: list[_Flight], rid, echo):
    texts = [[e] for e in echo]
    finals: dict[int, GenerationEvent] = {}
    try:
        while len(finals) < len(flights):
            got = await server.next_event(queue, http)
            if got is None:
                return _error(499, "client closed the request")
            i, event, at = got
            server.observe(flights[i], event, at)
            texts[i].append(event.text)
            if event.finish_reason:
                failed = _failure(event, flights[i].req)
                if failed is not None:
                    return failed
                finals[i] = event
        n = len(flights)
        choices = [api.completion_choice(i, "".join(texts[i]), finals[i].finish_reason) for i in range(n)]
        return api.completion_response(rid, server.settings.model_name, choices, [finals[i].timings for i in range(n)])
    finally:
        for f in flights:
            server.engine.cancel(f.req)


async def _completion_stream(server: Server, http, queue, flights: list[_Flight], rid, echo, include_usage):
    name, created = server.settings.model_name, int(time.time())
    finals: dict[int, GenerationEvent] = {}

    def chunk(choice):
        out = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    try:
        for i, e in enumerate(echo):
            if e:
                yield chunk(api.completion_choice(i, e, None))
        while len(finals) < len(flights):
            got = await server.next_event(queue, http)
            if got is None:
                return
            i, event, at = got
            server.observe(flights[i], event, at)
            if event.finish_reason:
                failed = _failure(event, flights[i].req)
                if failed is not None:
                    yield json.loads(failed.body)
                    yield "[DONE]"
                    return
                finals[i] = event
            if event.text or event.finish_reason:
                yield chunk(api.completion_choice(i, event.text, event.finish_reason))
        if include_usage:
            yield {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                   "usage": api.usage([finals[i].timings for i in range(len(flights))])}
        yield "[DONE]"
    finally:
        for f in flights:
            server.engine.cancel(f.req)


def _failure(event: GenerationEvent, req) -> JSONResponse | None:
    """The error response for a request the engine ended without an answer, else None."""
    if event.finish_reason == "error":
        return _error(503, req.error or "generation failed", code="engine_error")
    if event.finish_reason in ("cancelled", "interrupted"):
        return _error(503, "the request was cancelled: the server is shutting down", code="cancelled")
    return None
