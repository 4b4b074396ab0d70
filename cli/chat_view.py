"""How `llm chat` shows an answer as it streams: plain text (pipes, NO_COLOR), or Markdown re-rendered live."""

from __future__ import annotations

import re
import time

from . import render


class PlainView:
    """Text as it comes, flushed piece by piece; a newline ends the answer."""

    def __enter__(self):
        return self

    def add(self, text: str) -> None:
        render.write(text)

    def __exit__(self, *exc) -> None:
        render.write("\n")


class MarkdownView:
    """Markdown re-rendered live as the answer grows. Redraws are spaced by what they cost, so a long answer
    spends its time generating, not re-rendering; the final, complete render happens on exit."""

    def __init__(self, console):
        self.console = console
        self.text = ""
        self.live = None
        self.last = 0.0
        self.interval = 0.05

    def __enter__(self):
        from rich.live import Live
        from rich.text import Text

        self.live = Live(Text("…", style="dim"), console=self.console, auto_refresh=False,
                         vertical_overflow="ellipsis")
        self.live.start(refresh=True)
        return self

    def add(self, text: str) -> None:
        self.text += text
        now = time.perf_counter()
        if text and now - self.last >= self.interval:
            self._draw()
            self.last = time.perf_counter()
            self.interval = max(0.05, 4 * (self.last - now))

    def _draw(self) -> None:
        from rich.markdown import Markdown

        self.live.update(Markdown(markdown_source(self.text)), refresh=True)

    def __exit__(self, *exc) -> None:
        from rich.markdown import Markdown

        self.live.update(Markdown(markdown_source(self.text)))
        self.live.stop()


_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_TAG = re.compile(r"<(/?[A-Za-z_][\w-]*)>")


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
