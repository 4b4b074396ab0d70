"""The suite runs apart from the user's own state: config, caches and working folder are its own (issue #28)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.cli_util import run_llm

REPO = Path(__file__).resolve().parent.parent


def test_config_cache_and_hub_folders_are_the_suite_s_own():
    home = Path.home().resolve()
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME", "HF_HOME"):
        path = Path(os.environ[var]).resolve()
        assert home not in path.parents and path != home, f"{var}={path} is the user's"
    assert "HF_HUB_CACHE" not in os.environ


def test_working_folder_is_neither_the_repo_nor_shared(tmp_path):
    cwd = Path.cwd().resolve()
    assert cwd != REPO and REPO not in cwd.parents
    assert not any(cwd.iterdir())  # each test starts in an empty folder of its own


def test_an_alias_in_the_users_real_file_reaches_no_subprocess(tmp_path):
    # What `llm aliases set` in the README leaves behind in a real home must not change completion results.
    fake_home = tmp_path / "home"
    (fake_home / ".config" / "llm-torch").mkdir(parents=True)
    (fake_home / ".config" / "llm-torch" / "aliases.json").write_text(json.dumps({"mine": "smollm2"}))
    r = run_llm(env={"HOME": str(fake_home), "_LLM_COMPLETE": "complete_bash", "COMP_WORDS": "llm chat ", "COMP_CWORD": "2"})
    assert "mine" not in r.stdout.decode().split(), "XDG_CONFIG_HOME must be set by the suite, not inherited"


def test_readme_gives_a_cpu_only_install_that_matches_the_quick_start():
    # Issue #28: PyPI's torch on Linux is the CUDA build; the README must give the CPU wheel index line.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    quick = next(line for line in lines if line.endswith("llm chat") and "torch==2.13.0" in line)
    cpu = [line for line in lines if "--index-url https://download.pytorch.org/whl/cpu" in line]
    assert len(cpu) == 1, "one CPU-only install line"
    assert cpu[0].replace("torch --index-url https://download.pytorch.org/whl/cpu", "torch==2.13.0") == quick
