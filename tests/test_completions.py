"""Shell completions: completions/ matches what the app generates; the model argument completes models."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llm_torch.cli.completions import FILES, complete_model, completion_script
from tests.cli_util import run_llm

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


@pytest.mark.parametrize("shell", sorted(FILES))
def test_completion_scripts_are_current(shell):
    """Regenerate with: for s in bash zsh fish; do llm completions $s > completions/<file>; done (see README)."""
    path = COMPLETIONS / FILES[shell]
    assert path.is_file(), f"{path} is missing"
    assert path.read_text(encoding="utf-8") == completion_script(shell), (
        f"{path} is stale: run `llm completions {shell} > completions/{FILES[shell]}`"
    )


def test_completions_command_prints_the_script():
    r = run_llm("completions", "zsh")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == completion_script("zsh")
    assert "completions" in run_llm("--help").stdout.decode()  # listed (issue #18)


def test_one_completion_mechanism():
    """`llm completions SHELL` only: Typer's --install-completion / --show-completion are not offered."""
    out = run_llm("--help", env={"COLUMNS": "200"}).stdout.decode()
    assert "completions" in out
    assert "--install-completion" not in out and "--show-completion" not in out
    r = run_llm("--show-completion", "bash")
    assert r.returncode == 2 and b"No such option" in r.stderr


def test_readme_install_lines_work_in_a_fresh_home(tmp_path):
    """The README's bash / zsh / fish lines, run as written with an empty $HOME."""
    readme = (COMPLETIONS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Shell completions", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in section.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 3, lines
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    for line in lines[1:]:  # zsh, fish (the bash line sources the script into a shell)
        r = subprocess.run(["bash", "-c", line], cwd=COMPLETIONS.parent, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (line, r.stderr)
    assert (home / ".zfunc" / "_llm").is_file() and (home / ".config" / "fish" / "completions" / "llm.fish").is_file()
    r = subprocess.run(["bash", "-c", lines[0].replace("/path/to/llm-torch", str(COMPLETIONS.parent))],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def fake_hf_cache(root: Path, repo_id: str) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    return root


def test_model_completion_offers_cached_models_and_the_alias(tmp_path):
    cache = fake_hf_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf")
    env = {"HF_HUB_CACHE": str(cache), "_LLM_COMPLETE": "complete_bash"}
    for command in ("visualize-mask", "tokenize"):
        r = run_llm(env={**env, "COMP_WORDS": f"llm {command} ", "COMP_CWORD": "2"})
        assert r.stdout.decode().split() == ["smollm2", "meta-llama/Llama-2-7b-hf"], r.stderr
    r = run_llm(env={**env, "COMP_WORDS": "llm tokenize meta", "COMP_CWORD": "2"})
    assert r.stdout.decode().split() == ["meta-llama/Llama-2-7b-hf"]
    r = run_llm(env={**env, "COMP_WORDS": "llm chat meta", "COMP_CWORD": "2"})
    assert r.stdout.decode().split() == ["meta-llama/Llama-2-7b-hf"]
    r = run_llm(env={**env, "COMP_WORDS": "llm generate -m sm", "COMP_CWORD": "3"})
    assert r.stdout.decode().split() == ["smollm2"]


def test_model_completion_survives_a_missing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing-here"))
    assert complete_model("") == ["smollm2"]
    assert complete_model("sm") == ["smollm2"]


def test_model_completion_offers_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing-here"))
    (tmp_path / "my-model").mkdir()
    (tmp_path / "weights.gguf").write_text("")
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    assert complete_model("./") == ["./my-model/", "./weights.gguf"]
    assert complete_model("./w") == ["./weights.gguf"]


def test_command_names_complete():
    r = run_llm(env={"_LLM_COMPLETE": "complete_bash", "COMP_WORDS": "llm visu", "COMP_CWORD": "1"})
    assert r.stdout.decode().split() == ["visualize-mask"]
