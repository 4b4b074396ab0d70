"""Shared option groups (cli/option_groups.py), --threads and --context on the model commands, and the
commands that must answer without importing torch."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from tests.cli_util import needs_model, run_llm


LONG = "The capital of France is a city with a long history and many famous places to visit and see"

# Runs the typer app in-process, then fails when torch was imported.
NO_TORCH = """
import sys
sys.argv = ["llm", *sys.argv[1:]]
from llm_torch.cli.app import main
try:
    main()
except SystemExit as e:
    code = e.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["chat", "--help"], ["completions", "bash"],
                                  ["completions", "zsh"], ["completions", "fish"]])
def test_answers_without_importing_torch(args):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout


@pytest.mark.parametrize("args", [["generate", "-m", "./no-such-model", "hi"], ["tokenize", "/no/such/model", "hi"],
                                  ["visualize-mask", "./no-such-model", "hi"], ["perplexity", "~/no-such-model"]])
def test_a_missing_model_path_fails_without_importing_torch(args):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr.decode()
    assert b"error: no model at" in r.stderr and b"torch was imported" not in r.stderr


def no_torch(*args: str, input: bytes = b"") -> subprocess.CompletedProcess:
    """`llm ARGS` in a subprocess that fails ("torch was imported") when the command imported torch."""
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, timeout=120, input=input,
                          env={**os.environ, "NO_COLOR": "1"})


@needs_model
@pytest.mark.parametrize("args", [["tokenize", "smollm2", "Hello"], ["tokenize", "-m", "smollm2", "--decode", "1,2"],
                                  ["template", "smollm2", "Hi"], ["visualize-mask", "smollm2", "Hi", "--format", "json"],
                                  ["models"], ["aliases", "list"], ["models", "--show", "smollm2"]])
def test_commands_that_need_no_tensors_import_no_torch(args):
    r = no_torch(*args)
    assert r.returncode == 0, r.stderr.decode()
    assert b"torch was imported" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--task", "no-such-task", "Hi"], "unknown task"),
    (["run", "--lines", "--input", "x.txt"], "--lines reads stdin"),
    (["perplexity", "smollm2"], "no text to score"),
    (["embed", "smollm2", "--pooling", "max", "Hi"], "unknown pooling"),
    (["embed", "smollm2"], "no input given"),
    (["generate", "-m", "no-such-alias", "Hi"], "no model at no-such-alias"),
    (["chat", "-m", "no-such-alias"], "no model at no-such-alias"),
    (["generate", "--dry-run", "-m", "no-such-alias"], "no model at no-such-alias"),
    (["tokenize", "Hello"], "no model given"),
])
def test_errors_found_before_a_model_loads_import_no_torch(args, message):
    r = no_torch(*args)
    assert r.returncode == 1, r.stderr.decode()
    assert message in r.stderr.decode() and b"torch was imported" not in r.stderr


@contextlib.contextmanager
def openai_stub():
    """An OpenAI-compatible server that answers GET /v1/models: all llm chat --base-url asks before a message."""
    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def test_chat_with_a_server_imports_no_torch():
    with openai_stub() as url:
        r = no_torch("chat", "--base-url", url)  # stdin at its end: the chat connects, then ends
    assert r.returncode == 0, r.stderr.decode()
    assert b"torch was imported" not in r.stderr


def test_help_lists_the_groups_and_completions():
    out = run_llm("generate", "--help", env={"COLUMNS": "200"}).stdout.decode()
    for flag in ("--temperature", "--top-k", "--top-p", "--min-p", "--repetition-penalty", "--seed", "--stop",
                 "--model", "--dtype", "--device", "--device-map", "--quantize", "--tp", "--compile", "--dry-run",
                 "--chat-template", "--threads", "--context", "--kv-cache", "--format", "--stats"):
        assert flag in out, flag
    assert "Sampling" in out and "Model and device" in out
    assert "completions" in run_llm("--help").stdout.decode()
    serve = run_llm("serve", "--help", env={"COLUMNS": "200"}).stdout.decode()
    assert "--context" in serve and "--max-context" in serve  # the old name stays
    bench = run_llm("bench", "--help", env={"COLUMNS": "200"}).stdout.decode()
    assert "--threads" in bench and "-t" in bench and "--temperature" not in bench and "--kv-cache" in bench
    assert "--kv-cache" in serve


def test_groups_expand_in_place_with_a_commands_choices():
    import inspect

    from llm_torch.cli.bench import bench
    from llm_torch.cli.chat import chat
    from llm_torch.cli.generate import generate

    params = inspect.signature(generate).parameters
    assert {"temperature", "stop", "model", "threads", "context", "format", "stats"} <= set(params)
    assert "sampling" not in params and "output" not in params
    chat_params = inspect.signature(chat).parameters
    assert "stop" not in chat_params and "format" not in chat_params and "temperature" in chat_params
    assert "threads" in inspect.signature(bench).parameters and "device_map" not in inspect.signature(bench).parameters
    r = run_llm("bench", "-t", "0")  # bench keeps its short -t for the shared --threads
    assert r.returncode == 2 and b"--threads" in r.stderr and b"-t" in r.stderr, r.stderr


@needs_model
def test_threads_reach_torch_and_the_kernels():
    r = run_llm("generate", "-n", "3", "--temperature", "0", "--threads", "1", "--stats", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert ", 1 thread " in r.stderr.decode()  # the loaded line: torch.get_num_threads() after --threads
    assert r.stdout.decode().strip()


@needs_model
def test_context_reaches_the_engine():
    r = run_llm("generate", "-n", "4", "--temperature", "0", "--context", "16", LONG)
    assert r.returncode == 1
    assert b"the context holds 16" in r.stderr and b"--truncate" in r.stderr
    ok = run_llm("generate", "-n", "4", "--temperature", "0", "--context", "16", "--truncate", "--format", "json", LONG)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["usage"]["prompt_tokens"] == 15  # left-truncated to the context, one position kept for the answer
    assert b"left-truncated" in ok.stderr


@needs_model
def test_context_in_run_chat_perplexity_and_bench():
    r = run_llm("run", "--context", "16", "--truncate", "error", "-n", "2", LONG)
    assert r.returncode == 1 and b"the context holds 16" in r.stderr
    r = run_llm("chat", "-n", "2", "--temperature", "0", "--context", "64", input="Hi\n/status\n")
    assert r.returncode == 0, r.stderr
    assert "of 64 tokens used" in r.stderr.decode()
    r = run_llm("perplexity", "smollm2", "--context", "8", "--format", "json", input=LONG)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["context"] == 8
    r = run_llm("bench", "--context", "16", "-p", "32", "-n", "0", "-r", "1")
    assert r.returncode == 1 and b"does not fit the context of 16 tokens" in r.stderr


@needs_model
def test_context_sizes_the_memory_plan():
    for args in (["generate", "--dry-run", "--context", "100"], ["serve", "--dry-run", "--max-context", "100"],
                 ["serve", "--dry-run", "--context", "100"]):
        r = run_llm(*args)
        assert r.returncode == 0, r.stderr
        assert "KV for 100 tokens" in r.stdout.decode(), args


@needs_model
def test_kv_cache_format_sizes_the_memory_plan():
    """SmolLM2-135M: 30 layers x 3 key/value heads x 64 values, keys and values: 4096 tokens take 90 MiB in f16
    (auto for its float16 weights), 180 MiB in f32, 47.8 MiB in int8 (64 codes + a 2-byte scale per 32)."""
    per_token = 2 * 30 * 3
    for kv, shown, values in (("auto", "f16", 64 * 2), ("f32", "f32", 64 * 4), ("int8", "int8", 64 + 4)):
        r = run_llm("serve", "--dry-run", "--context", "4096", "--kv-cache", kv)
        assert r.returncode == 0, r.stderr
        assert f"{per_token * values * 4096 / 2**30:.2f} GiB {shown} KV for 4096 tokens" in r.stdout.decode(), kv
    r = run_llm("generate", "--dry-run", "--kv-cache", "q4")
    assert r.returncode == 1 and b"unknown KV cache format 'q4'" in r.stderr


@needs_model
def test_a_context_past_the_models_limit_is_refused_by_the_memory_plan():
    # SmolLM2: max_position_embeddings 8192, no rope_scaling; --dry-run applies the engine's rule, no clamp.
    r = run_llm("generate", "--dry-run", "--context", "100000")
    assert r.returncode == 1 and b"longer than the model supports" in r.stderr
