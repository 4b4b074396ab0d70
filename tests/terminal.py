"""A small terminal emulator for pseudo-terminal tests: what a user's screen and scrollback hold after a
program's output, not the bytes it wrote (a redrawn region is many copies of the same text in the bytes).

It knows what `llm` and readline write: printable text with the xterm autowrap rule (a character in the
last column wraps only when the next one comes), CR, LF, BS, and the CSI cursor moves and erases; colours
and modes are ignored. A cursor moved up stops at the top row: rows that scrolled off cannot be redrawn,
which is how a redraw taller than the screen leaves copies behind.
"""

from __future__ import annotations

import re

_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
_OTHER_ESCAPE = re.compile(r"\x1b(?:[()][0-9A-Za-z]|[=>78DEHMNOZc\\])")
_UNFINISHED = re.compile(r"\x1b(?:\[[0-9;?]*|[()])?")


class Terminal:
    def __init__(self, rows: int, cols: int):
        self.rows, self.cols = rows, cols
        self.screen = [[" "] * cols for _ in range(rows)]
        self.scrollback: list[str] = []
        self.row = self.col = 0
        self.wrap_pending = False
        self.unfinished = ""  # an escape sequence cut by the end of the last feed

    def feed(self, data: str) -> None:
        data, self.unfinished = self.unfinished + data, ""
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                m = _CSI.match(data, i)
                if m:
                    self._csi(m.group(1), m.group(2))
                    i = m.end()
                    continue
                m = _OTHER_ESCAPE.match(data, i)
                if not m and _UNFINISHED.fullmatch(data, i):
                    self.unfinished = data[i:]
                    return
                i = m.end() if m else i + 1
                continue
            if ch == "\r":
                self.col, self.wrap_pending = 0, False
            elif ch == "\n":
                self._line_feed()
                self.wrap_pending = False
            elif ch == "\b":
                self.col, self.wrap_pending = max(0, self.col - 1), False
            elif ch >= " ":
                if self.wrap_pending:
                    self.col, self.wrap_pending = 0, False
                    self._line_feed()
                self.screen[self.row][self.col] = ch
                if self.col == self.cols - 1:
                    self.wrap_pending = True
                else:
                    self.col += 1
            i += 1

    def lines(self) -> list[str]:
        """Scrollback then screen, trailing spaces removed, empty rows at the bottom dropped."""
        out = self.scrollback + ["".join(row).rstrip() for row in self.screen]
        while out and not out[-1]:
            out.pop()
        return out

    def _line_feed(self) -> None:
        if self.row == self.rows - 1:
            self.scrollback.append("".join(self.screen.pop(0)).rstrip())
            self.screen.append([" "] * self.cols)
        else:
            self.row += 1

    def _csi(self, args: str, command: str) -> None:
        if args.startswith("?"):
            return  # modes (cursor shown, bracketed paste): nothing on the screen
        numbers = [int(a) if a else 0 for a in args.split(";")] if args else []
        n = max(1, numbers[0]) if numbers else 1
        self.wrap_pending = False
        if command == "A":
            self.row = max(0, self.row - n)
        elif command == "B":
            self.row = min(self.rows - 1, self.row + n)
        elif command == "C":
            self.col = min(self.cols - 1, self.col + n)
        elif command == "D":
            self.col = max(0, self.col - n)
        elif command == "G":
            self.col = min(self.cols - 1, n - 1)
        elif command == "H":
            self.row = min(self.rows - 1, n - 1)
            self.col = min(self.cols - 1, (max(1, numbers[1]) if len(numbers) > 1 else 1) - 1)
        elif command == "K":
            mode = numbers[0] if numbers else 0
            line = self.screen[self.row]
            start, end = {0: (self.col, self.cols), 1: (0, self.col + 1), 2: (0, self.cols)}.get(mode, (0, 0))
            line[start:end] = [" "] * (end - start)
        elif command == "J":
            mode = numbers[0] if numbers else 0
            if mode == 0:
                self.screen[self.row][self.col:] = [" "] * (self.cols - self.col)
                for r in range(self.row + 1, self.rows):
                    self.screen[r] = [" "] * self.cols
            elif mode == 2:
                self.screen = [[" "] * self.cols for _ in range(self.rows)]
        elif command == "P":  # delete characters (readline's line editing)
            line = self.screen[self.row]
            del line[self.col:self.col + n]
            line.extend([" "] * (self.cols - len(line)))
        elif command == "@":  # insert blanks
            line = self.screen[self.row]
            line[self.col:self.col] = [" "] * n
            del line[self.cols:]
