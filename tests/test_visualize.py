"""`llm visualize-mask`: golden text output, JSON equal to the masks the model's forward builds, no weights read.

Set LLM_UPDATE_GOLDEN=1 to rewrite tests/golden/ after an intended change of the drawing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llm_torch.cli.app import app
from llm_torch.core.model.config import ModelConfig, read_config_json
from llm_torch.core.model.masks import layer_type_masks
from tests.cli_util import run_llm
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, write_tokenizer_files

GOLDEN = Path(__file__).parent / "golden"
TEXT10 = "The quick brown fox jumps over the lazy dog"  # BOS + 9 tokens with the SmolLM2 tokenizer


def write_tokenizer_folder(folder: Path, cfg: dict | None, tokenizer, *, add_bos: bool = True) -> Path:
    """A model folder WITHOUT weights: config.json (optional) + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_files(folder, tokenizer, add_bos_token=add_bos)
    return folder


@pytest.fixture(scope="session")
def smol_tokenizer():
    from llm_torch.core.placement.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2"))


@pytest.fixture(scope="session")
def models(tmp_path_factory, smol_tokenizer) -> Path:
    """A folder holding tiny-llama/ and tiny-gemma2/: config + tokenizer only (no weights)."""
    root = tmp_path_factory.mktemp("masks")
    vocab = {"vocab_size": smol_tokenizer.vocab_size}
    write_tokenizer_folder(root / "tiny-llama", config_dict(LLAMA_BASE, vocab), smol_tokenizer)
    write_tokenizer_folder(root / "tiny-gemma2", config_dict(GEMMA2_BASE, vocab), smol_tokenizer)
    return root


@pytest.fixture
def llm(models, monkeypatch):
    """Run the app in-process from the models folder (so titles hold the short relative name)."""
    monkeypatch.chdir(models)
    monkeypatch.setenv("NO_COLOR", "1")

    def invoke(*args: str):
        result = CliRunner().invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return invoke


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LLM_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs (LLM_UPDATE_GOLDEN=1 rewrites it)"


def test_golden_llama(llm):
    out = llm("visualize-mask", "tiny-llama", "Hello world, how are you?", "--max-tokens", "40")
    assert out.exit_code == 0, out.output
    check_golden("visualize_llama.txt", out.stdout)


def test_golden_gemma2_sliding_window(llm):
    out = llm("visualize-mask", "tiny-gemma2", TEXT10, "--sliding-window", "3", "--max-tokens", "40")
    assert out.exit_code == 0, out.output
    check_golden("visualize_gemma2_w3.txt", out.stdout)
    lines = out.stdout.splitlines()
    assert lines[0] == "Attention mask: tiny-gemma2 (10 tokens)"
    assert "global causal (layers 1,3)" in lines[1] and "sliding window 3 (layers 0,2)" in lines[1]
    assert lines[1].index("global") < lines[1].index("sliding")  # global | sliding, side by side
    assert "'<|im_start|>'" in out.stdout  # BOS is drawn, labelled like repr


def test_golden_ascii_elided_padded(llm):
    out = llm("visualize-mask", "tiny-gemma2", TEXT10, "--sliding-window", "3", "--pad-to", "14", "--max-tokens", "6", "--ascii")
    assert out.exit_code == 0, out.output
    check_golden("visualize_gemma2_ascii_elided_padded.txt", out.stdout)
    assert "■" not in out.stdout and "⬚" not in out.stdout


def test_default_window_from_config(llm):
    out = llm("visualize-mask", "tiny-gemma2", TEXT10, "--max-tokens", "40")
    assert "sliding window 6 (layers 0,2)" in out.stdout


def test_elision_never_wraps(llm):
    text = " ".join(["word"] * 60)
    out = llm("visualize-mask", "tiny-gemma2", text, "--max-tokens", "8")
    lines = out.stdout.splitlines()
    rows = [line for line in lines if "'" in line]
    assert len(rows) == 8  # 4 first + 4 last rows; the rest behind one … row
    assert sum(1 for line in lines if line.lstrip().startswith("…")) == 1
    assert "53 tokens not shown" in lines[-1]
    width = max(len(line) for line in lines)
    assert width < 80


def test_default_fits_terminal_width(llm, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    text = " ".join(["word"] * 60)
    out = llm("visualize-mask", "tiny-gemma2", text)
    grid = [line for line in out.stdout.splitlines()[1:-2]]
    assert max(len(line) for line in grid) <= 60
    assert "…" in out.stdout


def _json(llm, *args):
    out = llm("visualize-mask", *args, "--format", "json")
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_json_equals_layer_type_masks(llm, models):
    data = _json(llm, "tiny-gemma2", TEXT10, "--sliding-window", "3")
    cfg = ModelConfig.from_dict(read_config_json(models / "tiny-gemma2"))
    T = len(data["tokens"][0])
    assert T == 10 and data["tokens"][0][0] == "<|im_start|>" and data["sliding_window"] == 3
    expected = layer_type_masks(cfg.layer_types, 3, T, T)
    assert set(data["masks"]) == set(expected)
    for kind, mask in expected.items():
        assert data["masks"][kind]["allowed"] == mask[:, 0].tolist()


def test_json_equals_the_models_forward_masks(llm, models):
    """The matrices are the ones DecoderModel._masks_without_cache hands to attention (real rows; padded rows are unused)."""
    from llm_torch.core.placement.loading import build_model

    cfg = ModelConfig.from_dict(read_config_json(models / "tiny-gemma2"))  # window 6 < 10 tokens: the forward builds window masks
    data = _json(llm, "tiny-gemma2", TEXT10, "short text", "--pad-to", "12")
    model = build_model(cfg).model
    padding = torch.tensor([[not p for p in row] for row in data["padding"]])
    forward = model._masks_without_cache(12, padding.long(), "cpu")
    for kind, got in data["masks"].items():
        got = torch.tensor(got["allowed"])
        want = forward[kind][:, 0]
        real_rows = padding[:, :, None].expand_as(got)
        assert torch.equal(got[real_rows], want[real_rows])
        assert not got[~real_rows].any()  # padded query rows are drawn fully masked


def test_padding_several_texts(llm):
    data = _json(llm, "tiny-llama", "Hi", TEXT10)
    assert len(data["tokens"]) == 2 and len(data["tokens"][0]) == 10
    assert data["tokens"][0][:8] == ["<pad>"] * 8 and data["padding"][0] == [True] * 8 + [False] * 2
    mask = torch.tensor(data["masks"]["full_attention"]["allowed"][0])
    assert not mask[:, :8].any() and not mask[:8].any()  # padded columns and rows are masked
    assert mask[8:, 8:].tolist() == [[True, False], [True, True]]


def test_layer_option(llm):
    data = _json(llm, "tiny-gemma2", "Hi there", "--layer", "1")
    assert list(data["masks"]) == ["full_attention"] and data["masks"]["full_attention"]["layers"] == [1]
    data = _json(llm, "tiny-gemma2", "Hi there", "--layer", "2", "-w", "2")
    assert list(data["masks"]) == ["sliding_attention"]
    assert data["masks"]["sliding_attention"]["allowed"][0][2] == [False, True, True]


def test_no_weights_are_read(models, monkeypatch, llm):
    import llm_torch.core.placement.loading as loading
    from llm_torch.core.checkpoint import safetensors as st_io

    def boom(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(st_io, "read_tensors", boom)
    monkeypatch.setattr(st_io, "read_index", boom)
    monkeypatch.setattr(loading, "build_model", boom)
    assert not list((models / "tiny-gemma2").glob("*.safetensors"))
    out = llm("visualize-mask", "tiny-gemma2", "Hello")
    assert out.exit_code == 0


def test_errors_are_one_line(models):
    r = run_llm("visualize-mask", str(models / "tiny-llama"), "Hi", "--sliding-window", "3")
    assert r.returncode != 0
    assert r.stderr.decode().strip().startswith("error: this model has no sliding-window layers")
    assert len(r.stderr.decode().strip().splitlines()) == 1
    r = run_llm("visualize-mask", str(models / "tiny-gemma2"), "Hi", "--layer", "9")
    assert r.returncode != 0 and "out of range" in r.stderr.decode()


def test_stdin_and_plain_pipe(models):
    r = run_llm("visualize-mask", str(models / "tiny-llama"), input="Hello there")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "'Hello'" in out and "\x1b[" not in out  # piped: plain text, no colour codes


def test_colour_path_draws_the_same_grid(llm, monkeypatch):
    """On a terminal the lines go through Rich with styles; the characters are the plain ones."""
    from llm_torch.cli import render

    plain = llm("visualize-mask", "tiny-gemma2", TEXT10, "-w", "3", "--max-tokens", "40").stdout
    monkeypatch.setattr(render, "color_enabled", lambda stream: True)
    coloured = llm("visualize-mask", "tiny-gemma2", TEXT10, "-w", "3", "--max-tokens", "40").stdout
    assert coloured == plain  # CliRunner is no terminal, so Rich writes no escape codes


def test_gguf_config_without_weights(llm):
    data = _json(llm, "smollm2", "Hi")
    assert data["model"] == "smollm2" and list(data["masks"]) == ["full_attention"]
