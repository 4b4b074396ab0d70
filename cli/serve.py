"""`llm serve`: an OpenAI-compatible HTTP server (core/serving/server.py) over the batched engine, run by uvicorn."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .option_groups import Model, group, with_groups


@with_groups
def serve(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="The model (same forms as -m); default: smollm2.",
                                      autocompletion=o.complete_model)
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. 0.0.0.0 exposes the server to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free port, printed at start).")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar="LLM_API_KEY", help="Require 'Authorization: Bearer KEY' (env LLM_API_KEY).")
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]], typer.Option("--cors-origin", help="Allow browser pages from this origin (repeatable; '*' for any).")
    ] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences generated at once (KV cache slots).")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests waiting for a slot before 429s.")] = 64,
    prefill_chunk: Annotated[
        int, typer.Option("--prefill-chunk", min=1, help="Prompt tokens per engine step (longer prompts are split).")
    ] = 256,
    max_body: Annotated[int, typer.Option("--max-body", min=1, help="Largest request body, in MiB (413 beyond).")] = 4,
    prefix_reuse: Annotated[
        bool, typer.Option("--prefix-reuse/--no-prefix-reuse", help="Reuse the KV of prompt prefixes already cached.")
    ] = True,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level: warning, info (one line per request), debug.")] = "warning",
    model: Model = group(Model, exclude=("compile",), names={"context": ("--max-context",)}),
) -> None:
    """Serve a model to many clients at once over an OpenAI-compatible HTTP API.

    Endpoints: /v1/chat/completions, /v1/completions and /v1/models (as OpenAI's), /health and /metrics."""
    import os
    import socket

    from llm_torch.core.errors import InputError
    from llm_torch.core.serving.api_key import checked_api_key

    if api_key is None and os.environ.get("LLM_API_KEY") == "":
        api_key = ""  # click reads an empty variable as unset; `LLM_API_KEY=$(cat missing)` is as blank as the flag
    api_key = checked_api_key(api_key)  # before the port and the weights: a blank key is a mistake, not "no key"
    model = model.with_argument(model_arg)
    if model.handled_before_input():
        return
    try:  # before loading: a port in use fails at once, not after the weights are read
        sock = socket.create_server((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         hint="pick another --port (0 picks a free one)") from None
    try:
        _serve(sock, model, api_key, tuple(cors_origin or ()), max_batch, max_queue, prefill_chunk, prefix_reuse,
               max_body, log_level)
    finally:
        sock.close()


def _serve(sock, model, api_key, cors, max_batch, max_queue, prefill_chunk, prefix_reuse, max_body, log_level) -> None:
    import signal
    import sys
    import threading

    import prometheus_client
    import uvicorn

    from llm_torch.core.engine.engine import Engine, EngineConfig
    from llm_torch.core.serving.engine_thread import EngineThread
    from llm_torch.core.serving.server import LoadingGate, ServeSettings, create_app

    # HTTP is up before the weights are read: /health answers 503 "loading" meanwhile (as llama.cpp's server),
    # so a supervisor polling it sees the server start instead of refused or hanging connections.
    gate = LoadingGate()
    server = uvicorn.Server(uvicorn.Config(gate, log_level=log_level, timeout_graceful_shutdown=5, lifespan="off"))
    engine = None

    def stop(*_):
        if engine is not None:
            engine.cancel_all()
            engine.stop()
        server.should_exit = True

    def http():
        try:
            server.run(sockets=[sock])
        finally:  # however uvicorn ends, the engine loop ends with it
            stop()

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    web = threading.Thread(target=http, name="llm-http", daemon=True)
    web.start()
    render.info(f"listening at http://{shown}:{port} (/health answers 503 until the model is loaded)")
    try:
        loaded = model.load(quiet=False, tokenizer_needed=True)
        config = EngineConfig(max_batch=max_batch, max_queue=max_queue, max_context=model.context,
                              prefill_chunk=prefill_chunk, prefix_reuse=prefix_reuse)
        engine = EngineThread(Engine(loaded.model, loaded.tokenizer, config))
    except BaseException:
        server.should_exit = True
        web.join(10)
        raise
    settings = ServeSettings(loaded.name, api_key=api_key, cors_origins=cors, max_body_bytes=max_body * 2**20,
                             generation_config=loaded.generation_config)
    # A `_created` timestamp series beside every counter and histogram doubles /metrics and no dashboard reads
    # it (vLLM drops them too); process-wide, so this process's owner decides, not core.
    prometheus_client.disable_created_metrics()
    gate.open(create_app(engine, loaded.tokenizer, settings))
    # Two busy threads (engine steps, the event loop's streaming) hand the GIL back and forth every token;
    # a shorter switch interval than Python's 5 ms: 206 -> 213 tok/s at 8 clients, 58 -> 61 at 1 (small).
    sys.setswitchinterval(0.0005)

    limit = engine.engine.kv_bytes_limit / 2**20
    render.info(f"serving {loaded.name} at http://{shown}:{port}/v1 (OpenAI-compatible; max batch {max_batch}, "
                f"queue {max_queue}, context {engine.engine.context}, KV cache up to {limit:.0f} MiB"
                f"{', API key required' if api_key else ''}); Ctrl-C to stop")
    if host not in ("127.0.0.1", "::1", "localhost") and not api_key:
        render.warn(f"listening on {host} without --api-key: anyone who can reach this port can use the model")
    # The engine loop runs on this (the main) thread (core/serving/engine_thread.py says why), uvicorn on another.
    # Ctrl-C / SIGTERM: in-flight requests are cancelled (their streams end), then both loops stop; exit 0.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if web.is_alive():
            engine.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.should_exit = True
        web.join(10)
    render.info("server stopped")

