"""`llm tokenize`: tokens and ids from tokenizer files only; JSON, --no-special, --chat, --decode, stdin."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llm_torch.cli.app import app
from tests.cli_util import run_llm
from tests.test_visualize import smol_tokenizer, write_tokenizer_folder  # noqa: F401 (fixture)

TEXT = "The quick brown fox"


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory, smol_tokenizer):  # noqa: F811
    """Only tokenizer.json + tokenizer_config.json: no config.json, no weights."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("tok") / "tokenizer-only", None, smol_tokenizer)


def llm(*args: str, input: str | None = None):
    result = CliRunner().invoke(app, list(args), input=input, env={"NO_COLOR": "1"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_json_ids_and_tokens(tok_folder, smol_tokenizer):  # noqa: F811
    out = llm("tokenize", str(tok_folder), TEXT, "--format", "json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert set(data) == {"ids", "tokens"}
    assert data["ids"][0] == smol_tokenizer.token_to_id(smol_tokenizer.bos_token)  # add_bos_token in the folder
    assert data["ids"][1:] == smol_tokenizer.encode(TEXT, add_special_tokens=False)
    assert data["tokens"] == ["<|im_start|>", "The", "Ġquick", "Ġbrown", "Ġfox"]


def test_no_special_leaves_out_bos(tok_folder, smol_tokenizer):  # noqa: F811
    data = json.loads(llm("tokenize", str(tok_folder), TEXT, "--no-special", "-f", "json").stdout)
    assert data["ids"] == smol_tokenizer.encode(TEXT, add_special_tokens=False)
    assert data["tokens"][0] == "The"


def test_chat_tokenizes_the_rendered_prompt(tok_folder, smol_tokenizer):  # noqa: F811
    data = json.loads(llm("tokenize", str(tok_folder), "Hi", "--chat", "-f", "json").stdout)
    rendered = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert data["ids"] == smol_tokenizer.encode(rendered, add_special_tokens=False)
    assert "<|im_start|>" in data["tokens"] and "<|im_end|>" in data["tokens"]
    with_system = json.loads(llm("tokenize", str(tok_folder), "Hi", "--chat", "-s", "Be brief.", "-f", "json").stdout)
    assert "Be brief." in smol_tokenizer.decode(with_system["ids"])
    assert "Be brief." not in smol_tokenizer.decode(data["ids"])


def test_decode(tok_folder, smol_tokenizer):  # noqa: F811
    ids = smol_tokenizer.encode(TEXT, add_special_tokens=False)
    out = llm("tokenize", str(tok_folder), "--decode", ",".join(map(str, ids)))
    assert out.exit_code == 0, out.output
    assert out.stdout == TEXT + "\n"
    data = json.loads(llm("tokenize", str(tok_folder), "--decode", " ".join(map(str, ids)), "-f", "json").stdout)
    assert data == {"ids": ids, "tokens": smol_tokenizer.convert_ids_to_tokens(ids), "text": TEXT}


def test_decode_no_special_drops_special_tokens(tok_folder, smol_tokenizer):  # noqa: F811
    ids = smol_tokenizer.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert "<|im_start|>" in llm("tokenize", str(tok_folder), "--decode", ",".join(map(str, ids))).stdout
    out = llm("tokenize", str(tok_folder), "--decode", ",".join(map(str, ids)), "--no-special")
    assert out.exit_code == 0, out.output
    assert out.stdout == "user\nHi\n"
    data = json.loads(llm("tokenize", str(tok_folder), "--decode", ",".join(map(str, ids)), "--no-special", "-f", "json").stdout)
    assert data["text"] == "user\nHi" and data["ids"] == ids  # the ids and tokens stay as given


def test_plain_text_when_piped(tok_folder):
    r = run_llm("tokenize", str(tok_folder), TEXT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["0", "1", "2", "3", "4"]
    assert [line.split("\t")[2] for line in lines] == ["'<|im_start|>'", "'The'", "'Ġquick'", "'Ġbrown'", "'Ġfox'"]
    assert "\x1b[" not in r.stdout.decode()


def test_text_from_stdin(tok_folder):
    r = run_llm("tokenize", str(tok_folder), "-f", "json", input=TEXT + "\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"][1:] == ["The", "Ġquick", "Ġbrown", "Ġfox"]


def test_table_on_a_terminal(tok_folder, monkeypatch):
    """On a TTY the Rich table is drawn (forced here through render.color_enabled)."""
    from llm_torch.cli import render

    monkeypatch.setattr(render, "color_enabled", lambda stream: True)
    out = llm("tokenize", str(tok_folder), TEXT)
    assert out.exit_code == 0, out.output
    assert "5 tokens" in out.stdout and "'Ġquick'" in out.stdout and "' quick'" in out.stdout
    assert "┃" in out.stdout or "│" in out.stdout


def test_embedded_gguf_tokenizer():
    out = llm("tokenize", "smollm2", "Hello", "-f", "json", "--no-special")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["tokens"] == ["Hello"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--decode", "1,x"], "comma-separated integer ids"),
        (["--decode", "999999999"], "outside the vocabulary"),
        (["Hi", "--system", "S"], "--system needs --chat"),
        (["Hi", "--decode", "1"], "--decode takes no text"),
    ],
)
def test_errors_are_one_line(tok_folder, args, message):
    r = run_llm("tokenize", str(tok_folder), *args)
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and message in err and len(err.splitlines()) == 1, err
