"""The only printer. Results go to stdout; logs, warnings, progress and stats go to stderr.

Colour and Markdown only on a terminal without NO_COLOR; piped output is plain text.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from functools import lru_cache

from rich.console import Console


def color_enabled(stream) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


@lru_cache(maxsize=1)
def err_console() -> Console:
    return Console(stderr=True, highlight=False, no_color=not color_enabled(sys.stderr), soft_wrap=True)


@lru_cache(maxsize=1)
def out_console() -> Console:
    """Rich rendering of results on stdout (tables, Markdown, mask grids): one console for every command."""
    return Console(highlight=False, no_color=not color_enabled(sys.stdout))


def warn(message: str) -> None:
    err_console().print(f"[yellow]warning:[/] {message}" if color_enabled(sys.stderr) else f"warning: {message}", markup=True)


def info(message: str) -> None:
    err_console().print(message, style="dim", markup=False)


def error(message: str, hint: str | None = None) -> None:
    line = f"error: {message}" + (f" (hint: {hint})" if hint else "")
    if color_enabled(sys.stderr):
        err_console().print(f"[bold red]error:[/] {_escape(message)}" + (f" [dim](hint: {_escape(hint)})[/]" if hint else ""))
    else:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


class OutputClosed(Exception):
    """stdout's reader went away (`| head`). Not an OSError, so click does not turn it into exit 1."""


def write(text: str) -> None:
    """Streamed result text: written and flushed so pipes see each piece as it comes."""
    if text:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            raise OutputClosed() from None


def show(renderable, **kwargs) -> None:
    """A Rich renderable (table, styled text) on stdout, through the one stdout console."""
    try:
        out_console().print(renderable, **kwargs)
    except BrokenPipeError:
        raise OutputClosed() from None


def note(text: str) -> None:
    """A dim line of a result on stdout (bench's notes under its table on a terminal)."""
    show(text, style="dim", markup=False)


def prompt(text: str) -> None:
    """Interactive prompt text on stderr, no newline (stdout is a file or pipe: it keeps only answers)."""
    sys.stderr.write(text)
    sys.stderr.flush()


@contextmanager
def progress(description: str, unit: str, total: int | None = None):
    """A progress line on stderr while long work runs: done/total, rate, elapsed and ETA (a terminal only;
    off one nothing is printed, so piped and CI logs stay as they were). Yields update(done, total=None,
    note=None), which the work's progress callback calls; the line is erased when the block ends.

    unit: what is counted ("tok", "inputs", "layers", "runs"); "B" shows sizes and bytes/s."""
    if not shows_progress():
        yield lambda done, total=None, note=None: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rich.table import Column

    # One line at any terminal width: the fixed columns never fold; the bar (up to 24 cells) and then the note
    # (a tensor name, a file) get what is left of the width, the note cut with an ellipsis.
    fixed = lambda: Column(no_wrap=True)  # noqa: E731
    count, rate = _count_columns(unit, fixed)
    spare = err_console().width - len(description) - _FIXED_CELLS
    bar_width = min(24, max(0, spare))
    note = TextColumn("{task.fields[note]}", table_column=Column(
        no_wrap=True, overflow="ellipsis", max_width=max(0, spare - bar_width - 1)))
    bar = Progress(TextColumn("{task.description}", table_column=fixed()),
                   *([BarColumn(bar_width=bar_width)] if bar_width >= 5 else []), count, rate,
                   TimeElapsedColumn(table_column=fixed()), TextColumn("eta", table_column=fixed()),
                   TimeRemainingColumn(table_column=fixed()), *([note] if spare - bar_width > 4 else []),
                   console=err_console(), transient=True,
                   # Results printed meanwhile go above the line; on stdout when stdout is a file or pipe.
                   redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)
    with bar:
        task = bar.add_task(description, total=total, note="")

        def update(done: int, total: int | None = None, note: str | None = None) -> None:
            fields = {"note": note} if note is not None else {}
            if total is not None:
                fields["total"] = total
            bar.update(task, completed=done, **fields)

        yield update


# Cells the columns after the description take at most: "1,000.0/1,000.0 MB" "1,000.0 MB/s" "0:00:00" "eta"
# "0:00:00" and the spaces between them.
_FIXED_CELLS = 18 + 12 + 7 + 3 + 7 + 6


def tracked(items, description: str, unit: str, total: int | None = None):
    """`items` passed through, counted on a progress line (see progress) as each is taken."""
    with progress(description, unit, total) as update:
        for n, item in enumerate(items, 1):
            yield item
            update(n)


def shows_progress() -> bool:
    """Whether progress lines are shown (stderr is a terminal): worth counting a total for them."""
    return sys.stderr.isatty()


def _count_columns(unit: str, column):
    """(done/total, rate) columns for `unit`; column() makes each one's table column."""
    from rich.progress import DownloadColumn, ProgressColumn, TransferSpeedColumn
    from rich.text import Text

    if unit == "B":
        return DownloadColumn(table_column=column()), TransferSpeedColumn(table_column=column())

    class Count(ProgressColumn):
        def render(self, task):
            done = f"{int(task.completed):,}"
            return Text(f"{done}/{int(task.total):,} {unit}" if task.total is not None else f"{done} {unit}",
                        style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")

    return Count(table_column=column()), Rate(table_column=column())


def absolute(path) -> str:
    """A path as the commands print it: absolute (symlinks kept), whatever form the user typed."""
    return os.path.abspath(os.path.expanduser(str(path)))


def write_json(obj) -> None:
    import json

    write(json.dumps(obj, ensure_ascii=False) + "\n")


def peak_rss_mib() -> float:
    from llm_torch.core.tools.machine import peak_rss_bytes  # one definition (VmHWM, not ru_maxrss)

    return peak_rss_bytes() / 2**20


def stats_line(timings, device: str | None = None) -> str:
    computed = timings.prompt_tokens - timings.cached_tokens
    cached = f" (+{timings.cached_tokens} cached)" if timings.cached_tokens else ""
    return (
        f"prefill: {computed} tok{cached}, {timings.prefill_tokens_per_second:.1f} tok/s | "
        f"decode: {timings.completion_tokens} tok, {timings.decode_tokens_per_second:.1f} tok/s | "
        f"TTFT {timings.time_to_first_token:.3f} s | peak RSS {peak_rss_mib():.0f} MiB"
        + (f" | {device}" if device else "")
    )
