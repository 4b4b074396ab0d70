"""Run the real `llm` command in a subprocess (stdin/stdout/exit codes as a user sees them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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
