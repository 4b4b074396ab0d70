"""How `llm chat` shows an answer as it streams: plain text (pipes, NO_COLOR), or Markdown on a terminal.

Each answer reaches the screen exactly once. The Markdown view prints finished blocks (paragraphs, code
blocks) for good and redraws only the block being written, never more rows than the screen holds: a
redraw moves the cursor up over its own rows, and rows that scrolled off the top cannot be reached, so a
taller redraw would leave a copy of its first rows behind.
"""

from __future__ import annotations

import os
import re
import signal
import time
from contextlib import contextmanager

from . import render


class PlainView:
    """Text as it comes, flushed piece by piece; a newline ends the answer."""

    def __enter__(self):
        return self

    def add(self, text: str) -> None:
        render.write(text)

    def above(self, show) -> None:
        show()

    def __exit__(self, *exc) -> None:
        render.write("\n")


class MarkdownView:
    """Markdown as the answer grows: settled blocks printed once, the open block redrawn in place (its last
    rows when taller than the screen). Redraws are spaced by what they cost, so a long answer spends its time
    generating, not re-rendering."""

    def __init__(self, console):
        self.console = console
        self.text = ""
        self.printed = 0  # chars of `text` printed for good (a block boundary)
        self.blocks = 0  # blocks printed for good (the next one needs a blank line before it)
        self.rows = 0  # rows the redrawn part takes on screen; the cursor is at the end of its last row
        self.shown: list[str] = []  # those rows
        self.last = 0.0
        self.interval = 0.05

    def __enter__(self):
        with held_interrupts():
            self._redraw([self._styled("…", "dim")])  # the answer has started
        return self

    def add(self, text: str) -> None:
        self.text += text
        now = time.perf_counter()
        if text and now - self.last >= self.interval:
            with held_interrupts():
                self._settle(settled_end(self.text))
                self._redraw(self._lines(self.text[self.printed:]))
            self.last = time.perf_counter()
            self.interval = max(0.05, 4 * (self.last - now))

    def above(self, show) -> None:
        """Run `show` (it prints whole lines, e.g. a warning on stderr) above the part being redrawn."""
        with held_interrupts():
            kept = self.shown
            self._redraw([])
            show()
            self._redraw(kept)

    def __exit__(self, *exc) -> None:
        with held_interrupts():
            self._settle(len(self.text))
            self._redraw([])

    # ---- drawing -------------------------------------------------------------------------------------

    def _width(self) -> int:
        # One column short of the screen: a full row leaves the cursor in the terminal's pending-wrap state,
        # which terminals resolve differently, and the row count of a redraw must not depend on that.
        return max(10, self.console.width - 1)

    def _render(self, renderable) -> list[str]:
        with self.console.capture() as capture:
            self.console.print(renderable, width=self._width())
        return capture.get().split("\n")[:-1]

    def _styled(self, text: str, style: str) -> str:
        from rich.text import Text

        return self._render(Text(text, style=style))[0]

    def _lines(self, source: str) -> list[str]:
        from rich.markdown import Markdown

        if not source.strip():
            return []
        lines = self._render(Markdown(markdown_source(source)))
        # The blank line Markdown puts between blocks (a list brings its own).
        return [""] + lines if self.blocks and lines and lines[0] else lines

    def _settle(self, end: int) -> None:
        """Print text[printed:end] (whole blocks) for good, in place of the redrawn part."""
        if end <= self.printed:
            return
        lines = self._lines(self.text[self.printed:end])
        self._redraw([])
        self._write("".join(line + "\n" for line in lines))
        self.printed, self.blocks = end, self.blocks + bool(lines)

    def _redraw(self, lines: list[str]) -> None:
        # At most a screen less a row: the cursor must be able to climb back to the first one.
        lines = lines[-max(1, self.console.height - 1):]
        erase = "\r\x1b[2K" + "\x1b[1A\x1b[2K" * (self.rows - 1) if self.rows else ""
        self._write(erase + "\n".join(lines))
        self.rows, self.shown = len(lines), lines

    def _write(self, data: str) -> None:
        if not data:
            return
        file = self.console.file
        try:
            fd = file.fileno()
        except (AttributeError, OSError, ValueError):  # not a file descriptor (a test's StringIO)
            file.write(data)
            file.flush()
            return
        # os.write, not the file object: Python's buffered writer can drop a byte when a signal (Ctrl-C) comes
        # while a write to a full terminal blocks, and one lost newline misplaces every later redraw.
        file.flush()
        raw = data.encode(getattr(file, "encoding", None) or "utf-8", "replace")
        while raw:
            raw = raw[os.write(fd, raw):]


@contextmanager
def held_interrupts():
    """Ctrl-C waits until the screen and the view's row count agree again (a KeyboardInterrupt between a
    write and its bookkeeping would make the next redraw climb the wrong number of rows)."""
    pending = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    except ValueError:  # not the main thread: signals are not delivered here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_TAG = re.compile(r"<(/?[A-Za-z_][\w-]*)>")


def settled_end(text: str) -> int:
    """Where the blocks of `text` that can no longer change end: after its last blank line outside a code
    block, or after a code block's closing fence. Text past it is the block still being written."""
    end = pos = 0
    in_code = False
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break  # the line being written
        if _FENCE.match(line):
            in_code = not in_code
            if not in_code:
                end = pos
        elif not in_code and not line.strip():
            end = pos
    return end


def markdown_source(text: str) -> str:
    """Model text as Markdown that shows what the model wrote: a single newline stays a line break (Markdown
    would join the lines), and tag-like words such as <think> are shown, not swallowed as HTML. Code blocks
    and `code spans` are left alone."""
    out, in_code = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
            out.append(line)
        elif in_code:
            out.append(line)
        else:
            parts = line.split("`")
            parts[0::2] = [_TAG.sub(r"\\<\1\\>", p) for p in parts[0::2]]
            out.append("`".join(parts) + ("  " if line.strip() else ""))
    return "\n".join(out)
