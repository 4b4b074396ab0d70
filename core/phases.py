"""Start-up phase marks for benchmarks/startup.py: with LLM_PHASES=FILE set, each mark(name) records the wall
clock (time.time(), comparable with the launching process's), the process's CPU time (steady on a busy machine,
where wall times swing) and its resident and peak memory, and the CLI writes them to FILE at exit.

Unset (the normal case) a mark is one global test; imports nothing heavy (called before torch loads)."""

from __future__ import annotations

import os
import time

_MARKS: list[tuple[str, float, float, int, int]] | None = [] if os.environ.get("LLM_PHASES") else None


def mark(name: str) -> None:
    """The phase `name` ended now (a no-op unless LLM_PHASES is set)."""
    if _MARKS is not None:
        _MARKS.append((name, time.time(), time.process_time(), *_memory()))


def marks() -> list[tuple[str, float, float, int, int]]:
    """(phase, wall clock at its end, process CPU seconds so far, RSS bytes then, peak RSS bytes so far) in order;
    empty unless LLM_PHASES is set."""
    return list(_MARKS or ())


def _memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes from /proc/self/status; (0, 0) where there is none (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return 0, 0
    return tuple(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
