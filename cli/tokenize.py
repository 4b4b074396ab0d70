"""`llm tokenize`: the tokens and ids a model sees for a text (tokenizer files only), or ids back to text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model


def tokenize(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="MODEL", help="Local folder, .gguf file, Hub id or alias (only tokenizer "
                                      "files are read); or -m.", autocompletion=complete_model)
    ] = None,
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT", help="Text to tokenize; piped stdin is appended after it.")] = None,
    model: o.NamedModelOpt = None,
    no_special: Annotated[
        bool, typer.Option("--no-special", help="Leave out BOS and other special tokens (with --decode: from the decoded text).")
    ] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Tokenize the rendered chat prompt (one user message).")] = False,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System message (with --chat).")] = None,
    decode: Annotated[Optional[str], typer.Option("--decode", "-d", help="Decode comma-separated ids instead, e.g. 1,2,3.")] = None,
    format: Annotated[o.OutputFormat, typer.Option("--format", "-f", help="text (a table) or json.")] = o.OutputFormat.text,
    chat_template: o.ChatTemplateOpt = None,
    legacy: Annotated[
        Optional[bool],
        typer.Option("--legacy/--no-legacy", help="LlamaTokenizer's legacy: a prefix space after every special token "
                     "too (default: the checkpoint's tokenizer_config.json, else no)."),
    ] = None,
    add_prefix_space: Annotated[
        Optional[bool],
        typer.Option("--add-prefix-space/--no-add-prefix-space", help="LlamaTokenizer's add_prefix_space: a "
                     "'▁' before the text (default: the checkpoint's tokenizer_config.json, else yes)."),
    ] = None,
) -> None:
    """Show the tokens and ids of a text (a table on a terminal, tab-separated when piped), or decode ids."""
    import shlex
    import sys

    from llm_torch.core.errors import InputError

    from llm_torch.core.checkpoint import open_checkpoint, resolve_model

    from .common import encode_prompt, read_prompt, use_chat_template
    from .model_args import at_most_one, model_and_inputs

    model, inputs = model_and_inputs(model, [model_arg, text], command="tokenize")
    text = at_most_one(inputs, command="tokenize", what="TEXT")
    if system and not chat:
        raise InputError("--system needs --chat")
    if decode is not None and (text or chat):
        raise InputError("--decode takes no text and no --chat", hint="give either the text or --decode IDS")
    ids = _parse_ids(decode) if decode is not None else None
    text = None if ids is not None else read_prompt(text, command=f"tokenize -m {shlex.quote(model)}")
    tokenizer = open_checkpoint(resolve_model(model, progress=sys.stderr.isatty(), weights=False)).tokenizer()
    tokenizer.override_spaces(legacy=legacy, add_prefix_space=add_prefix_space)
    use_chat_template(tokenizer, chat_template)
    if ids is None:
        ids = encode_prompt(tokenizer, text, chat=True, system=system) if chat else tokenizer.encode(text, add_special_tokens=not no_special)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if decode is not None:
        decoded = tokenizer.decode(ids, skip_special_tokens=no_special)
        if format is o.OutputFormat.json:
            render.write_json({"ids": ids, "tokens": tokens, "text": decoded})
        else:
            render.write(decoded + "\n")
        return
    if format is o.OutputFormat.json:
        render.write_json({"ids": ids, "tokens": tokens})
    elif render.color_enabled(sys.stdout):
        _table(ids, tokens, tokenizer)
    else:
        render.write("".join(f"{i}\t{t}\t{tok!r}\n" for i, (t, tok) in enumerate(zip(ids, tokens))))


def _parse_ids(spec: str) -> list[int]:
    from llm_torch.core.errors import InputError

    parts = [p.strip() for p in spec.replace(" ", ",").split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--decode expects comma-separated integer ids, got '{spec}'", hint="e.g. --decode 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise InputError(f"--decode expects non-negative ids, got '{spec}'", hint="e.g. --decode 1,2,3")
    return ids


def _table(ids: list[int], tokens: list[str], tokenizer) -> None:
    from rich.table import Table

    table = Table(title=f"{len(ids)} tokens", title_justify="left", header_style="bold")
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right", style="cyan")
    table.add_column("token")
    table.add_column("text")
    for n, (i, tok) in enumerate(zip(ids, tokens)):
        table.add_row(str(n), str(i), repr(tok), repr(tokenizer.decode([i])))
    render.show(table, markup=False)
