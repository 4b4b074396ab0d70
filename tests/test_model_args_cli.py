"""One way to name a model: -m/--model on every command that takes one (and the first argument where a command
had it), a model typed where a prompt goes refused with what to type, unknown commands answered with advice."""

from __future__ import annotations

import json

import pytest

from tests.cli_util import needs_model, run_llm



def err(r) -> str:
    return r.stderr.decode()


@needs_model
@pytest.mark.parametrize("args", [["tokenize", "{m}", "Hello world", "-f", "json"],
                                  ["template", "{m}", "Hi", "-f", "json"],
                                  ["visualize-mask", "{m}", "Hi", "there", "-f", "json"]])
def test_minus_m_and_the_first_argument_name_the_same_model(args):
    by_argument = run_llm(*[a.format(m="smollm2") for a in args])
    i = args.index("{m}")
    by_option = run_llm(*args[:i], *args[i + 1:], "-m", "smollm2")
    long_option = run_llm(*args[:i], "--model", "smollm2", *args[i + 1:])
    assert by_argument.returncode == 0, err(by_argument)
    assert json.loads(by_option.stdout) == json.loads(by_argument.stdout) == json.loads(long_option.stdout), err(by_option)


def test_minus_m_is_taken_by_perplexity_embed_convert_and_quantize(tmp_path):
    # Each gets past its options to its own first check (before: "No such option: -m", exit 2).
    r = run_llm("perplexity", "-m", "smollm2", str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and "cannot read" in err(r) and "missing.txt" in err(r), err(r)
    r = run_llm("embed", "-m", "smollm2", "--pooling", "max", "Hi")
    assert r.returncode == 1 and "unknown pooling 'max'" in err(r), err(r)
    r = run_llm("convert", "-m", "./no-such-model", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "no model at ./no-such-model" in err(r), err(r)
    r = run_llm("quantize", "-m", "smollm2", "./other-model", "--int8")
    assert r.returncode == 1 and "two models given" in err(r), err(r)
    r = run_llm("convert", "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "no model given" in err(r), err(r)


@needs_model
def test_perplexity_with_minus_m_scores_the_file(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("The capital of France is Paris. It is a large city.")
    r = run_llm("perplexity", "-m", "smollm2", str(text), "--format", "json")
    assert r.returncode == 0, err(r)
    assert json.loads(r.stdout)["documents"][0]["name"] == str(text)


def test_with_minus_m_every_argument_is_input():
    r = run_llm("tokenize", "-m", "smollm2", "Hello", "world")
    assert r.returncode == 1 and "takes one TEXT" in err(r) and "'Hello world'" in err(r), err(r)


def test_a_forgotten_model_is_named():
    r = run_llm("tokenize", "Hello")  # before: "no prompt given", with a hint to use llm generate
    assert r.returncode == 1, err(r)
    assert err(r).startswith("error: no model given") and "llm tokenize -m smollm2 Hello" in err(r)
    r = run_llm("template", "Hello there")
    assert r.returncode == 1 and "no model given" in err(r) and "llm template -m smollm2 'Hello there'" in err(r)
    r = run_llm("visualize-mask")
    assert r.returncode == 1 and "no model given" in err(r), err(r)


def test_a_model_where_the_prompt_goes_says_what_to_type():
    r = run_llm("generate", "smollm2", "Hello")  # ollama's `run MODEL PROMPT`; before: "unexpected extra argument"
    assert r.returncode == 1, err(r)
    assert "'smollm2' is a model, not a prompt" in err(r) and "llm generate -m smollm2 Hello" in err(r)
    r = run_llm("run", "smollm2")  # before: generated from the prompt "smollm2"
    assert r.returncode == 1 and not r.stdout, err(r)
    assert "'smollm2' is a model, not a prompt" in err(r) and "llm run -m smollm2 PROMPT" in err(r)
    r = run_llm("generate", "Hello", "world")
    assert r.returncode == 1 and "takes one prompt" in err(r) and "llm generate 'Hello world'" in err(r), err(r)


@needs_model
def test_a_prompt_that_is_a_model_name_is_fine_with_minus_m():
    r = run_llm("generate", "-m", "smollm2", "-n", "1", "--temperature", "0", "smollm2")
    assert r.returncode == 0, err(r)


@pytest.mark.parametrize("verb, advice", [("pull", "downloaded on first use"), ("list", "llm models"),
                                          ("ls", "llm models"), ("show", "llm models --show MODEL"),
                                          ("rm", "llm models --rm MODEL"), ("ps", "llm serve MODEL"),
                                          ("cp", "llm aliases set NAME MODEL")])
def test_ollama_verbs_say_what_to_use_instead(verb, advice):
    r = run_llm(verb, "smollm2")
    assert r.returncode == 2 and f"No such command '{verb}'" in err(r) and advice in err(r), err(r)


def test_unknown_commands_suggest_the_closest():
    r = run_llm("tokenise", "smollm2", "Hi")
    assert r.returncode == 2 and "Did you mean 'tokenize'?" in err(r), err(r)
    r = run_llm("modles")
    assert "Did you mean 'models'?" in err(r), err(r)
    r = run_llm("frobnicate")
    assert r.returncode == 2 and "Commands: generate, chat" in err(r), err(r)
