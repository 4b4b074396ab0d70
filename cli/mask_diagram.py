"""The attention-mask diagram of `llm visualize-mask`: a MaskView (core/tools/mask_view.py) drawn as lines of
(text, style) segments, then as plain text (pipes, goldens) or through Rich with colours (a terminal).
Styles are None or a key of STYLE_MAP."""

from __future__ import annotations

from llm_torch.core.tools.mask_view import PAD_LABEL, MaskView

from . import render

GLYPHS = {"unicode": ("■", "⬚"), "ascii": ("#", ".")}
ELLIPSIS = "…"
STYLE_MAP = {
    "title": "bold",
    "header": "bold cyan",
    "allowed": "green",
    "masked": "bright_black",
    "diagonal": "bold yellow",
    "pad": "dim red",
    "elided": "dim",
    "dim": "dim",
}
LABEL_WIDTH = 14  # longest token label shown (repr, cut with an ellipsis)
PANEL_GAP = "   "

Segment = tuple[str, "str | None"]


def cell_len(text: str) -> int:
    """Terminal columns `text` takes: wide (CJK, emoji) characters count 2, combining marks 0."""
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text
    )


def token_label(token: str, width: int = LABEL_WIDTH) -> str:
    """repr-escaped token text, cut to `width` terminal columns with an ellipsis."""
    text = token if token == PAD_LABEL else repr(token)
    if cell_len(text) <= width:
        return text
    while cell_len(text) > width - 1:
        text = text[:-1]
    return text + ELLIPSIS


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - cell_len(text))


def shown_indices(n: int, max_tokens: int | None) -> list[int | None]:
    """Indices to draw: all, or the first and last ones with None (an elision) in the middle."""
    if max_tokens is None or n <= max_tokens:
        return list(range(n))
    keep = max(max_tokens, 2)
    head = keep // 2
    tail = keep - head
    return list(range(head)) + [None] + list(range(n - tail, n))


def fit_layout(view: MaskView, width: int) -> tuple[int, bool]:
    """(max_tokens, stacked): the most tokens whose grid fits `width` columns.

    Panels go side by side when that still shows at least 8 tokens (or all); otherwise one below the other.
    """
    n = view.length
    index_w = len(str(max(n - 1, 0)))
    label_w = index_w + 1 + min(LABEL_WIDTH, max(cell_len(token_label(t)) for row in view.tokens for t in row)) + 1
    titles = [len(t) for t in view.titles.values()]

    def best(panel_titles: list[int]) -> int:
        for m in range(n, 1, -1):
            cells = 2 * m + (2 if m < n else 0)  # 2 columns per token, +2 for the elision column
            if label_w + sum(max(cells, t) for t in panel_titles) + (len(panel_titles) - 1) * len(PANEL_GAP) <= width:
                return m
        return 2

    side = best(titles)
    if len(titles) == 1 or side >= min(n, 8):
        return side, False
    return best([max(titles)]), True


def render_lines(
    view: MaskView,
    *,
    max_tokens: int | None = None,
    ascii: bool = False,
    stacked: bool = False,
    width: int | None = None,
) -> list[list[Segment]]:
    """The whole picture: title, per sequence a header and the panels side by side, then a legend.

    stacked: panels one below the other; width: the legend's entries go one per line beyond it.
    """
    on, off = GLYPHS["ascii" if ascii else "unicode"]
    B, n = view.real.shape
    lines: list[list[Segment]] = []
    padded = not bool(view.real.all())
    count = f"{n} tokens" + (f" x {B} sequences" if B > 1 else "")
    lines.append([(f"Attention mask: {view.model} ({count})", "title")])
    for b in range(B):
        if B > 1:
            pads = int((~view.real[b]).sum())
            lines.append([(f"sequence {b}" + (f" ({pads} padding)" if pads else ""), "header")])
        groups = [[k] for k in view.masks] if stacked else [list(view.masks)]
        for g, kinds in enumerate(groups):
            if g:
                lines.append([("", None)])
            lines.extend(_panels(view, b, shown_indices(n, max_tokens), on, off, kinds))
    entries: list[list[Segment]] = [[(on, "allowed"), (" may attend", None)], [(off, "masked"), (" masked", None)]]
    if padded:
        entries.append([(f"{PAD_LABEL}: left padding", None)])
    shown = shown_indices(n, max_tokens)
    if None in shown:
        entries.append([(f"{ELLIPSIS}: {n - len(shown) + 1} tokens not shown", None)])
    lines.append([("", None)])
    legend: list[Segment] = []
    for i, entry in enumerate(entries):
        legend.extend(([("   ", None)] if i else []) + entry)
    if width is not None and line_width([legend]) > width:
        lines.extend(entries)
    else:
        lines.append(legend)
    return lines


def _panels(view: MaskView, b: int, shown: list[int | None], on: str, off: str, kinds: list[str]) -> list[list[Segment]]:
    n = view.length
    index_w = len(str(max(n - 1, 0)))
    labels = {i: token_label(view.tokens[b][i]) for i in shown if i is not None}
    label_w = max(cell_len(s) for s in labels.values())
    left_w = index_w + 1 + label_w + 1
    grid_w = 2 * len(shown)
    panel_w = [max(grid_w, len(view.titles[k])) for k in kinds]
    real = view.real[b]
    out: list[list[Segment]] = []

    def row(left: list[Segment], cells_per_panel: list[list[Segment]]) -> list[Segment]:
        segs = list(left)
        for p, cells in enumerate(cells_per_panel):
            if p:
                segs.append((PANEL_GAP, None))
            width = sum(len(t) for t, _ in cells)
            segs.extend(cells)
            if p < len(cells_per_panel) - 1 and width < panel_w[p]:
                segs.append((" " * (panel_w[p] - width), None))
        return _trim(segs)

    # panel titles, centred over each grid
    out.append(row([(" " * left_w, None)], [[(view.titles[k].center(panel_w[p]), "header")] for p, k in enumerate(kinds)]))
    # vertical column indices: one header line per digit
    digits = len(str(max(n - 1, 0)))
    for d in range(digits):
        cells: list[Segment] = []
        for i in shown:
            if i is None:
                cells.append((ELLIPSIS + " " if d == digits - 1 else "  ", "elided"))
                continue
            s = str(i).rjust(digits)
            cells.append((s[d] + " ", "dim"))
        out.append(row([(" " * left_w, None)], [list(cells) for _ in kinds]))
    for q in shown:
        if q is None:
            left = [(" " * index_w + " " + ELLIPSIS.ljust(label_w) + " ", "elided")]
            cells = [(ELLIPSIS + " ", "elided")] * len(shown)
            out.append(row(left, [list(cells) for _ in kinds]))
            continue
        left = [(str(q).rjust(index_w) + " ", "dim"), (_pad(labels[q], label_w) + " ", None if real[q] else "pad")]
        per_panel = []
        for k in kinds:
            m = view.masks[k][b, q]
            cells = []
            for kk in shown:
                if kk is None:
                    cells.append((ELLIPSIS + " ", "elided"))
                    continue
                allowed = bool(m[kk])
                style = "diagonal" if kk == q and allowed else ("allowed" if allowed else ("masked" if real[q] and real[kk] else "pad"))
                cells.append(((on if allowed else off) + " ", style))
            per_panel.append(cells)
        out.append(row(left, per_panel))
    return out


def _trim(segs: list[Segment]) -> list[Segment]:
    """Drop trailing spaces of the line (goldens and pipes see no trailing whitespace)."""
    while segs:
        text, style = segs[-1]
        stripped = text.rstrip(" ")
        if stripped:
            segs[-1] = (stripped, style)
            break
        segs.pop()
    return segs


def line_width(lines: list[list[Segment]]) -> int:
    return max((sum(cell_len(t) for t, _ in line) for line in lines), default=0)


def lines_to_text(lines) -> str:
    """Rendered lines as plain text (no colour): what a pipe or a golden file gets."""
    return "\n".join("".join(t for t, _ in line) for line in lines) + "\n"


def show(lines: list[list[Segment]], *, color: bool) -> None:
    """The diagram on stdout: coloured through Rich, or plain text."""
    if not color:
        render.write(lines_to_text(lines))
        return
    from rich.text import Text

    for line in lines:
        text = Text()
        for piece, style in line:
            text.append(piece, style=STYLE_MAP.get(style) if style else None)
        render.show(text, overflow="ignore", no_wrap=True, soft_wrap=True)
