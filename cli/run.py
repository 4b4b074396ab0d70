"""`llm run --task ...`: the task pipelines over an argument, stdin or a file, one result per input."""

from __future__ import annotations

import itertools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .option_groups import Model, Sampling, group, with_groups


class RunFormat(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


class Truncation(str, Enum):
    warn = "warn"
    error = "error"


# Arguments after the input text reach the body (ctx.args), which says what to type instead (cli/model_args.py).
CONTEXT_SETTINGS = {"allow_extra_args": True}


@with_groups
def run(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], typer.Argument(help="Input text; piped stdin is combined with it (argument first).")] = None,
    task: Annotated[
        str, typer.Option("--task", help="text-generation | text-classification | token-classification | question-answering.")
    ] = "text-generation",
    lines: Annotated[bool, typer.Option("--lines", help="Each stdin line is one input (blank lines skipped).")] = False,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Read inputs from a .txt, .jsonl or .csv file.")] = None,
    column: Annotated[Optional[str], typer.Option("--column", help="Field of .jsonl/.csv rows holding the text (default: text).")] = None,
    format: Annotated[
        Optional[RunFormat], typer.Option("--format", "-f", help="text | json | jsonl. Default: text on a terminal, jsonl when piped with several inputs.")
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results to FILE (atomically) instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Inputs per forward pass.")] = 1,
    truncate: Annotated[Truncation, typer.Option("--truncate", help="Input longer than the context: warn (cut it) or error.")] = Truncation.warn,
    aggregation: Annotated[str, typer.Option("--aggregation", help="token-classification: none | simple.")] = "none",
    question: Annotated[Optional[str], typer.Option("--question", "-q", help="question-answering: the question (context from input).")] = None,
    doc_stride: Annotated[Optional[int], typer.Option("--doc-stride", min=0, help="question-answering: tokens shared by consecutive context windows (the pipeline's doc_stride). Default: min(max-seq-len / 2, 128).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option("--max-seq-len", min=2, help="question-answering: tokens per window, question included. Default: min(context, 384).")] = None,
    max_answer_len: Annotated[int, typer.Option("--max-answer-len", min=1, help="question-answering: longest answer in tokens.")] = 15,
    handle_impossible_answer: Annotated[bool, typer.Option("--handle-impossible-answer", help="question-answering: the empty answer may win.")] = False,
    max_new_tokens: o.MaxNewTokensOpt = 256,
    chat: Annotated[bool, typer.Option("--chat", help="text-generation: wrap each input in the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System message (with --chat).")] = None,
    return_full_text: Annotated[
        bool, typer.Option("--return-full-text/--no-return-full-text",
                           help="text-generation: generated_text starts with the input (the pipeline's return_full_text).")
    ] = True,
    sampling: Sampling = None,
    model: Model = group(Model, exclude=("compile",)),
) -> None:
    """Run a task pipeline over inputs from the argument, stdin (--lines: one per line) or --input FILE."""
    from .model_args import prompt_argument

    prompt = prompt_argument(model.model, prompt, ctx.args, command="run")
    if model.handled_before_input():
        return
    from llm_torch.core.errors import InputError
    from llm_torch.core.tasks.inputs import TASKS

    from .common import encode_prompt

    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint=f"tasks: {', '.join(TASKS)}")
    if system and not chat:
        raise InputError("--system needs --chat", hint="add --chat to use the model's chat template")
    if input is not None and lines:
        raise InputError("--lines reads stdin; with --input the file's format decides", hint="drop --lines")
    if input is not None and not input.is_file():
        raise InputError(f"no input file at {input}")

    multi = lines or input is not None
    if format is None:
        piped = output is not None or not sys.stdout.isatty()
        format = RunFormat.jsonl if multi and piped else RunFormat.text

    # Inputs are read before the model loads when they are one block, lazily (streamed) otherwise.
    items = _items(prompt, lines, input, column, question)

    loaded = model.load(quiet=True)
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.tasks import pipelines as p
    from llm_torch.core.tasks.base import PipelineOptions
    from llm_torch.core.tasks.inputs import count_file_items

    p.check_task(task, loaded.model, loaded.name)
    spec = GenerationSpec()
    if task == "text-generation":
        spec = sampling.generation(loaded.generation_config, max_new_tokens, truncate=truncate is Truncation.warn)
    opts = PipelineOptions(
        batch_size=batch_size,
        truncate=truncate.value,
        # --top-k: labels per input for text-classification, answers for question-answering, the sampling
        # cut-off for generation.
        top_k=sampling.top_k or 1,
        aggregation=aggregation,
        max_answer_len=max_answer_len,
        max_seq_len=max_seq_len,
        doc_stride=doc_stride,
        handle_impossible_answer=handle_impossible_answer,
        generation=spec,
        encode_prompt=lambda text: encode_prompt(loaded.tokenizer, text, chat=chat, system=system),
        return_full_text=return_full_text,
        context=model.context,
    )
    pipeline = p.Pipeline(loaded.model, loaded.tokenizer, task, opts, warn=render.warn)
    count = failed = 0

    def counted():
        nonlocal count, failed
        results = pipeline.run(items)
        if multi:  # many inputs: a progress line on a terminal, with a total when they come from a file
            in_file = count_file_items(input) if input is not None and render.shows_progress() else None
            total = None if in_file is None else in_file + (1 if prompt else 0)
            results = render.tracked(results, task, "inputs", total)
        for result in results:
            count += 1
            failed += result.get("finish_reason") == "error"
            yield result

    if output is None:
        _emit(counted(), format, render.write, multi)
    else:
        _emit_to_file(counted(), format, output, multi)
    if count == 0:
        # An empty file or all-blank stdin is not an error, but silence would look like a hang or a bug.
        render.warn("no inputs: nothing was run")
    if failed:
        # Each failed input already has its warning and its error object; the others ran.
        raise InputError(f"{failed} of {count} inputs failed", hint="see the warnings above")


def _items(prompt, lines, input, column, question):
    from llm_torch.core.errors import InputError
    from llm_torch.core.tasks.inputs import Item, file_items, text_lines

    from .common import read_prompt

    if input is not None:
        head = [Item(prompt, question, "argument")] if prompt else []
        return itertools.chain(head, file_items(input, column=column, question=question, warn=render.warn))
    if not lines:
        text = read_prompt(prompt, required=False)
        if not text.strip():
            raise InputError("no input given", hint='pass it as an argument or pipe it in: echo "Hello" | llm run --task ...')
        return [Item(text, question, "input")]
    head = [Item(prompt, question, "argument")] if prompt else []
    from .common import stdin_lines

    lines = stdin_lines() if not sys.stdin.isatty() else iter(())
    body = (Item(it.text, question, it.where) for it in text_lines(lines, warn=render.warn))
    return itertools.chain(head, body)


def _text_of(result: dict) -> str:
    """The human form of one result."""
    if "generated_text" in result:
        return result["generated_text"]
    if "answer" in result:
        return f"{result['answer']}\t{result['score']:.4f}\t{result['start']}-{result['end']}"
    if "entities" in result:
        return "\n".join(f"{e['word']}\t{e['label']}\t{e['score']:.4f}\t{e['start']}-{e['end']}" for e in result["entities"])
    rows = result.get("top_k") or [result]
    return "\n".join(f"{r['label']}\t{r['score']:.4f}" for r in rows)


def _emit(results, format: RunFormat, write, multi: bool) -> None:
    import json

    if format is RunFormat.jsonl:
        for r in results:
            write(json.dumps(r, ensure_ascii=False) + "\n")
    elif format is RunFormat.text:
        for r in results:
            write(_text_of(r) + "\n")
    else:
        # json: one document; an array when several inputs, written at the end (at Ctrl-C: the finished
        # inputs' results, then exit 130 as everywhere).
        collected = []
        try:
            collected.extend(results)
        finally:
            doc = collected if multi or len(collected) != 1 else collected[0]
            write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")


def _emit_to_file(results, format: RunFormat, path: Path, multi: bool) -> None:
    """Write into a temp file beside `path`, then os.replace: readers never see a half-written file.

    On an input error (bad JSON on line N) the jsonl/text results before it are still committed: they are valid.
    """
    from llm_torch.core.errors import LLMError
    from llm_torch.core.files import atomic_write

    stopped = None
    with atomic_write(path) as f:
        def write(text: str) -> None:
            f.write(text)
            f.flush()

        try:
            _emit(results, format, write, multi)
        except LLMError as e:
            # jsonl/text lines written so far are complete results; a json document is not.
            if format is RunFormat.json:
                raise
            stopped = e
    if stopped is not None:
        raise stopped
