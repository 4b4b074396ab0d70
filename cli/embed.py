"""`llm embed`: feature extraction, one vector per input (the decoder's last_hidden_state, pooled; core/tasks/embed.py)."""

from __future__ import annotations

import itertools
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model
from .option_groups import ONE_PROCESS_MODEL, Model, group, with_groups
from .run import Truncation


class EmbedFormat(str, Enum):
    jsonl = "jsonl"
    json = "json"


@with_groups
def embed(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Local folder, .gguf file, Hub id or "
                                                       "alias (smollm2); or -m.", autocompletion=complete_model)] = None,
    texts: Annotated[Optional[list[str]], typer.Argument(
        metavar="TEXT|-", help="Texts to embed, one input each; '-' (or none, when piped): each stdin line.")] = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Read inputs from a .txt, .jsonl or .csv file.")] = None,
    column: Annotated[Optional[str], typer.Option("--column", help="Field of .jsonl/.csv rows holding the text (default: text).")] = None,
    pooling: Annotated[str, typer.Option("--pooling", help="mean (over the input's tokens) | last (last token) | none (every token).")] = "mean",
    normalize: Annotated[bool, typer.Option("--normalize", help="Scale each vector to unit L2 norm.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Inputs per forward pass.")] = 1,
    truncate: Annotated[Truncation, typer.Option("--truncate", help="Input longer than the context: warn (cut it) or error.")] = Truncation.warn,
    format: Annotated[EmbedFormat, typer.Option("--format", "-f", help="jsonl (one object per input, streamed) | json (one array).")] = EmbedFormat.jsonl,
    model_options: Model = group(Model, exclude=(*ONE_PROCESS_MODEL, "kv_cache"), help={"model": o.MODEL_OR_ARGUMENT_HELP}),
) -> None:
    """Embed texts: the model's last hidden state, pooled per input (transformers' feature-extraction pipeline)."""
    import json

    from llm_torch.core.errors import InputError
    from llm_torch.core.tasks.embed import check_pooling

    from .model_args import model_and_inputs

    model, texts = model_and_inputs(model_options.model, [model_arg, *(texts or [])], command="embed")
    check_pooling(pooling)  # before anything is read or loaded
    if input is not None and not input.is_file():
        raise InputError(f"no input file at {input}")
    items = iter(_items(texts, input, column))
    first = next(items, None)  # an empty input fails before the model loads
    if first is None:
        raise InputError("no input given", hint="pass texts as arguments, pipe lines in, or use --input FILE")
    loaded = replace(model_options, model=model).load(quiet=True, head="feature_extraction")
    from llm_torch.core.tasks.base import PipelineOptions
    from llm_torch.core.tasks.pipelines import Pipeline

    opts = PipelineOptions(batch_size=batch_size, truncate=truncate.value, pooling=pooling, normalize=normalize,
                           context=model_options.context)
    results = Pipeline(loaded.model, loaded.tokenizer, "feature-extraction", opts, warn=render.warn).run(itertools.chain([first], items))
    results = render.tracked(results, "embedding", "inputs", _total(texts or [], input))
    if format is EmbedFormat.jsonl:
        for r in results:
            render.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        render.write(json.dumps(list(results), ensure_ascii=False) + "\n")


def _total(texts: list[str], input: Path | None) -> int | None:
    """How many inputs there are, when that is known without reading stdin (the progress line's total)."""
    if "-" in texts or (not texts and input is None) or not render.shows_progress():
        return None
    from llm_torch.core.tasks.inputs import count_file_items

    in_file = count_file_items(input) if input is not None else 0
    return None if in_file is None else len(texts) + in_file


def _items(texts: list[str], input: Path | None, column: str | None):
    from llm_torch.core.errors import InputError
    from llm_torch.core.tasks.inputs import Item, file_items, text_lines

    from .common import stdin_lines

    n = 0
    for text in texts:
        if text == "-":
            yield from text_lines(stdin_lines(), warn=render.warn)
            continue
        n += 1
        if not text.strip():
            raise InputError(f"argument {n} is empty", hint="each TEXT argument is one input to embed")
        yield Item(text, where=f"argument {n}")
    if input is not None:
        yield from file_items(input, column=column, question=None, warn=render.warn)
    elif not texts and not sys.stdin.isatty():
        yield from text_lines(stdin_lines(), warn=render.warn)


