"""Start-up phase marks for benchmarks/startup.py: with LLM_PHASES=FILE set, each mark(name) records the wall
clock (time.time(), comparable with the launching process's) and the CLI writes them to FILE at exit.

Unset (the normal case) a mark is one dict lookup; imports nothing heavy (called before torch loads)."""

from __future__ import annotations

import os
import time

_MARKS: list[tuple[str, float]] | None = [] if os.environ.get("LLM_PHASES") else None


def mark(name: str) -> None:
    """The phase `name` ended now (a no-op unless LLM_PHASES is set)."""
    if _MARKS is not None:
        _MARKS.append((name, time.time()))


def marks() -> list[tuple[str, float]]:
    """(phase, wall clock at its end) in order; empty unless LLM_PHASES is set."""
    return list(_MARKS or ())
