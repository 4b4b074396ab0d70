"""`llm generate` through a real subprocess on the embedded SmolLM2 model."""

import json

import pytest

from llm_torch.core.placement.loading import embedded_model_path
from tests.cli_util import needs_model, run_llm, shell



@needs_model
def test_stdin_only_and_json_schema():
    r = run_llm("generate", "-n", "8", "--temperature", "0", "--format", "json", input="The capital of France is")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "usage", "timings"}
    assert out["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] >= len(out["token_ids"]) >= 1
    assert out["usage"]["prompt_tokens"] == 5
    assert {"prefill_seconds", "prefill_tokens_per_second", "decode_seconds", "decode_tokens_per_second"} <= set(out["timings"])
    assert "Paris" in out["text"]
    assert r.stderr == b""


@needs_model
def test_argument_then_stdin_combine():
    both = run_llm("generate", "-n", "4", "--temperature", "0", "--format", "json", "The capital of", input="France is")
    alone = run_llm("generate", "-n", "4", "--temperature", "0", "--format", "json", "The capital of\nFrance is")
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["token_ids"] == json.loads(alone.stdout)["token_ids"]
    assert json.loads(both.stdout)["usage"] == json.loads(alone.stdout)["usage"]


@needs_model
def test_text_streams_plain_to_stdout_and_stats_to_stderr():
    r = run_llm("generate", "-n", "6", "--temperature", "0", "--stats", "The capital of France is")
    assert r.returncode == 0
    assert b"\x1b[" not in r.stdout and b"\x1b[" not in r.stderr
    assert r.stdout.decode().strip().startswith("Paris")
    assert b"tok/s" in r.stderr and b"tok/s" not in r.stdout


def gguf_elsewhere(tmp_path):
    """The built-in model's file at another path: a GGUF like any other, without the built-in's settings."""
    import os
    import shutil

    other = tmp_path / "other.gguf"
    try:
        os.link(embedded_model_path("smollm2"), other)
    except OSError:
        shutil.copyfile(embedded_model_path("smollm2"), other)
    return other


@needs_model
def test_a_model_without_generation_config_samples_by_default_and_greedy_is_one_flag_away(tmp_path):
    """The GGUF ships no generation_config: llama.cpp/ollama-like defaults, said by --stats; a seed repeats."""
    args = ["generate", "-m", str(gguf_elsewhere(tmp_path)), "-n", "12", "--format", "json", "--stats", "Once upon a time"]
    seeded = [run_llm(*args, "--seed", "7") for _ in range(2)]
    assert all(r.returncode == 0 for r in seeded)
    assert json.loads(seeded[0].stdout)["token_ids"] == json.loads(seeded[1].stdout)["token_ids"]
    err = seeded[0].stderr.decode()
    assert ("sampling: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repetition_penalty 1.1, seed 7 "
            "(unset flags: llm's defaults (the model has no generation_config)") in err
    greedy = run_llm(*args, "--temperature", "0")
    assert "sampling: greedy" in greedy.stderr.decode()
    from llm_torch.core.engine.engine import generate
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.placement.loading import load_model

    smol = load_model("smollm2", progress=False)
    ref = generate(smol.model, smol.tokenizer, smol.tokenizer.encode("Once upon a time"), GenerationSpec(max_new_tokens=12))
    assert json.loads(greedy.stdout)["token_ids"] == ref.token_ids  # plain greedy: no default penalty


@needs_model
def test_the_built_in_model_samples_as_its_card_does_and_answers():
    """At the defaults the 135M model answers a simple question (llm's defaults for models without a
    generation_config gave an essay on why 2+2 is five)."""
    args = ["generate", "--chat", "What is 2+2?", "-n", "24", "--seed", "1", "--stats", "--format", "json"]
    r = run_llm(*args)
    assert r.returncode == 0, r.stderr
    assert "sampling: temperature 0.2, top_k 50, top_p 0.9, seed 1 (unset flags: the model's generation_config" \
        in r.stderr.decode()
    assert "4" in json.loads(r.stdout)["text"]


@needs_model
def test_closed_pipe_exits_quietly():
    r = shell("llm generate -n 64 'Once upon a time' | head -c 5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == 5
    assert r.stderr == b""


@needs_model
def test_stop_string_is_not_printed():
    r = run_llm("generate", "-n", "32", "--format", "json", "--stop", "France", "The capital of France is Paris. The capital of Germany is Berlin. The capital of")
    out = json.loads(r.stdout)
    if out["finish_reason"] == "stop_string":
        assert "France" not in out["text"]


@needs_model
def test_chat_flag_uses_the_template():
    r = run_llm("generate", "--chat", "--system", "Answer in one word.", "-n", "8", "--format", "json", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["prompt_tokens"] > 15  # ChatML wrapping added tokens


def test_bad_model_path_is_one_line():
    r = run_llm("generate", "-m", "./no/such/model", "hello")
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no/such/model" in lines[0]
    assert b"Traceback" not in r.stderr and r.stdout == b""


def test_invalid_utf8_on_stdin_is_an_error():
    r = run_llm("generate", "-m", "./no/such/model", input=b"caf\xe9\n")
    assert r.returncode == 1
    assert b"not valid UTF-8" in r.stderr and b"0xe9" in r.stderr


def test_no_prompt_is_an_error():
    r = run_llm("generate", input=b"")
    assert r.returncode == 1 and b"no prompt" in r.stderr


def test_help_does_not_import_torch():
    r = shell("python -X importtime -c 'import sys; sys.argv=[\"llm\", \"--help\"]; from llm_torch.cli.app import main; main()' 2>&1 >/dev/null | grep -c -E '\\| +torch$' || true")
    assert r.stdout.decode().strip() == "0"
    r = run_llm("--help")
    assert r.returncode == 0 and b"generate" in r.stdout


def test_version():
    r = run_llm("--version")
    assert r.returncode == 0 and r.stdout.startswith(b"llm-torch ")


@needs_model
def test_llm_phases_writes_each_start_up_phase_in_order(tmp_path):
    """LLM_PHASES=FILE (core/phases.py, for benchmarks/startup.py): one JSON line per phase mark, in the order the
    phases ran, with the wall clock and the RSS / peak RSS at its end; nothing else changes."""
    path = tmp_path / "phases.jsonl"
    r = run_llm("generate", "-n", "1", "--temperature", "0", "Hi", env={"LLM_PHASES": str(path)})
    assert r.returncode == 0, r.stderr
    marks = [json.loads(line) for line in path.read_text().splitlines()]
    names = [m["phase"] for m in marks]
    expected = ["cli import", "parse arguments", "resolve", "import torch", "import loader", "open checkpoint", "plan",
                "tokenizer", "build model", "assign weights", "load", "prompt", "engine + runner", "forward", "write"]
    assert [n for n in dict.fromkeys(names) if n != "kernel library"] == expected
    assert [m["t"] for m in marks] == sorted(m["t"] for m in marks)
    assert [m["cpu"] for m in marks] == sorted(m["cpu"] for m in marks)
    assert all(0 < m["rss"] <= m["peak"] for m in marks)
    assert r.stdout.strip() and r.stderr == b""


def test_without_llm_phases_no_marks_are_kept():
    from llm_torch.core import phases

    phases.mark("something")
    assert phases.marks() == []
