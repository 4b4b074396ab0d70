"""Ctrl-C, as a user sends it: one convention for every command (exit 130 after flushing what was produced,
no traceback), checked on commands mid-work with the built-in model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.cli_util import LLM, needs_model

pytestmark = needs_model


def interrupt(args: list[str], tmp_path, *, cpu: float | None = None) -> tuple[int, bytes, bytes]:
    """Start `llm ARGS`, wait for its first stdout line (or, cpu: until it has worked that many CPU seconds, for
    output written only at the end), then SIGINT it as Ctrl-C does; -> exit code, all stdout, stderr."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("LLM_DEBUG", None)
    proc = subprocess.Popen([LLM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        first = b""
        if cpu is None:
            first = proc.stdout.readline()
            assert first, proc.stderr.read().decode()
            time.sleep(0.3)
        else:
            while cpu_seconds(proc.pid) < cpu:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, first + rest, err


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_ctrl_c_during_generate_exits_130_with_the_text_so_far(tmp_path):
    # Greedy, long: the answer runs for hundreds of tokens, so the signal lands mid-generation.
    code, out, err = interrupt(
        ["generate", "--temperature", "0", "-n", "1500", "Write a very long story: Once upon a time,\n"], tmp_path)
    assert code == 130, err.decode()
    assert out.strip() and b"Traceback" not in err


def test_ctrl_c_during_run_exits_130_after_the_finished_lines(tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"Write a story about the number {i}.\n" for i in range(100)))
    code, out, err = interrupt(["run", "-n", "48", "-i", "in.txt", "--format", "jsonl"], tmp_path)
    assert code == 130, err.decode()
    lines = out.decode().splitlines()
    assert 1 <= len(lines) < 100 and all(json.loads(line)["finish_reason"] for line in lines)
    assert b"Traceback" not in err


def test_ctrl_c_during_run_json_writes_the_finished_results(tmp_path):
    """--format json writes one document at the end: Ctrl-C still gets the finished inputs' array."""
    (tmp_path / "in.txt").write_text("".join(f"Write a story about the number {i}.\n" for i in range(100)))
    # Nothing is written before the end: interrupted once it has worked a while (loading takes ~1 CPU second).
    code, out, err = interrupt(["run", "-n", "48", "-i", "in.txt", "--format", "json"], tmp_path, cpu=8)
    assert code == 130, err.decode()
    assert len(json.loads(out)) < 100 and b"Traceback" not in err
