"""`llm visualize-mask`: draw the attention mask the model's forward builds (config + tokenizer only)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model


def visualize_mask(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="MODEL", help="Local folder, .gguf file, Hub id or alias (only config + "
                                      "tokenizer are read); or -m.", autocompletion=complete_model)
    ] = None,
    texts: Annotated[
        Optional[list[str]], typer.Argument(metavar="TEXT", help="Text(s) to tokenize; several texts make a left-padded batch. Default: stdin.")
    ] = None,
    model: o.NamedModelOpt = None,
    sliding_window: Annotated[
        Optional[int], typer.Option("--sliding-window", "-w", min=1, help="Override the model's sliding window (Gemma 2).")
    ] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", min=0, help="Show only this layer's mask.")] = None,
    pad_to: Annotated[Optional[int], typer.Option("--pad-to", min=1, help="Left-pad every text to N tokens.")] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option("--max-tokens", min=2, help="Elide the middle beyond N tokens. Default: fit the terminal.")
    ] = None,
    ascii: Annotated[bool, typer.Option("--ascii", help="Draw with # and . instead of ■ and ⬚.")] = False,
    no_special: Annotated[bool, typer.Option("--no-special", help="Leave out BOS and other added special tokens.")] = False,
    format: Annotated[o.OutputFormat, typer.Option("--format", "-f", help="text (a grid) or json (tokens + boolean matrices).")] = o.OutputFormat.text,
) -> None:
    """Draw the attention mask the model uses for a text: one panel per layer kind (no weights are loaded)."""
    import shutil
    import shlex
    import sys

    from llm_torch.core.checkpoint import open_checkpoint, resolve_model
    from llm_torch.core.tools.mask_view import build_mask_view

    from .common import read_prompt
    from .mask_diagram import fit_layout, line_width, render_lines, show
    from .model_args import model_and_inputs

    model, inputs = model_and_inputs(model, [model_arg, *(texts or [])], command="visualize-mask")
    inputs = inputs or [read_prompt(None, command=f"visualize-mask -m {shlex.quote(model)}")]
    resolved = resolve_model(model, progress=sys.stderr.isatty(), weights=False)
    source = open_checkpoint(resolved)
    tokenizer = source.tokenizer()
    sequences = []
    for text in inputs:
        ids = tokenizer.encode(text, add_special_tokens=not no_special)
        sequences.append((ids, tokenizer.convert_ids_to_tokens(ids)))
    view = build_mask_view(
        source.config, sequences, model=resolved.name, sliding_window=sliding_window, layer=layer, pad_to=pad_to
    )
    if format is o.OutputFormat.json:
        render.write_json(view.to_dict())
        return
    width = shutil.get_terminal_size((100, 24)).columns
    if max_tokens is None:
        max_tokens, stacked = fit_layout(view, width)
    else:  # side by side unless that is wider than the terminal
        stacked = len(view.masks) > 1 and line_width(render_lines(view, max_tokens=max_tokens)) > width
    lines = render_lines(view, max_tokens=max_tokens, ascii=ascii, stacked=stacked, width=width)
    show(lines, color=render.color_enabled(sys.stdout))

