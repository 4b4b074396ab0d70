"""`llm perplexity`: how well a model predicts texts (transformers' sliding-window recipe, core/tasks/perplexity.py)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model
from .option_groups import ONE_PROCESS_MODEL, Model, Output, group, with_groups


@with_groups
def perplexity(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Local folder, .gguf file, Hub id or "
                                                       "alias (smollm2); or -m.", autocompletion=complete_model)] = None,
    files: Annotated[Optional[list[str]], typer.Argument(metavar="FILE|-", help="Texts to score, one document each ('-' or none: stdin).")] = None,
    lines: Annotated[bool, typer.Option("--lines", help="Each non-empty line is a document of its own.")] = False,
    stride: Annotated[Optional[int], typer.Option("--stride", min=1, help="Tokens the window advances by. Default: half the window.")] = None,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Do not start each document with BOS.")] = False,
    model_options: Model = group(Model, exclude=ONE_PROCESS_MODEL, help={"model": o.MODEL_OR_ARGUMENT_HELP}),
    output: Output = group(Output, exclude=("stats",)),
) -> None:
    """Perplexity of texts: per document and in total (sliding window with stride, as transformers' recipe)."""
    from llm_torch.core.errors import InputError

    from .model_args import model_and_inputs

    model, files = model_and_inputs(model_options.model, [model_arg, *(files or [])], command="perplexity")
    documents = _documents(files or ["-"], lines)
    if not documents:
        raise InputError("no text to score", hint="give a FILE, or pipe text in: cat notes.txt | llm perplexity smollm2")
    # --context is the scoring window here, checked against the model by score() with its own wording
    loaded = replace(model_options, model=model, context=None).load(quiet=True, tokenizer_needed=True)
    from llm_torch.core.model.config import resolve_context
    from llm_torch.core.tasks.perplexity import Document, score, total

    window = resolve_context(loaded.config, model_options.context, "the window")  # the one score() uses too
    scores = []
    with render.progress("scoring", "tok") as update:
        for s in score(loaded.model, loaded.tokenizer, [Document(n, t) for n, t in documents], context=window,
                       stride=stride, add_bos=not no_bos, progress=update):
            scores.append(s)
            if not output.json:
                render.write(f"{s.name}\t{s.tokens} tokens\tperplexity {s.perplexity:.4f}\n")
    summary = total(scores)
    if output.json:
        render.write_json({"model": loaded.name, "context": window, "stride": stride or window // 2,
                           "documents": [s.to_dict() for s in scores], "total": summary})
    elif len(scores) > 1:
        render.write(f"total\t{summary['tokens']} tokens\tperplexity {summary['perplexity']:.4f}\n")
    render.info(f"{summary['tokens']} tokens scored at {summary['tokens_per_second']} tok/s "
                f"(window {window}, stride {stride or window // 2})")


def _documents(files: list[str], lines: bool) -> list[tuple[str, str]]:
    from llm_torch.core.errors import InputError

    out = []
    for name in files:
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {name}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{'stdin' if name == '-' else name} is not valid UTF-8",
                             hint="convert it to UTF-8, e.g. with iconv") from None
        label = "stdin" if name == "-" else name
        if lines:
            out += [(f"{label}:{n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        elif text.strip():
            out.append((label, text))
    return out
