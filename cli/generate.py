"""`llm generate`: one prompt in, streamed text (or one JSON object) out."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .option_groups import Model, Output, Sampling, with_groups


# Arguments after the prompt reach the body (ctx.args), which says what to type instead (cli/model_args.py).
CONTEXT_SETTINGS = {"allow_extra_args": True}


@with_groups
def generate(
    ctx: typer.Context,
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; piped stdin is appended after it.")] = None,
    max_new_tokens: o.MaxNewTokensOpt = 256,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System message (with --chat).")] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Left-truncate a prompt longer than the context.")] = False,
    sampling: Sampling = None,
    model: Model = None,
    output: Output = None,
) -> None:
    """Generate text from a prompt (argument and/or stdin); streams to stdout."""
    from llm_torch.core.phases import mark

    from .model_args import prompt_argument

    mark("parse arguments")

    prompt = prompt_argument(model.model, prompt, ctx.args, command="generate")
    if model.handled_before_input():
        return
    from llm_torch.core.errors import InputError

    from .common import encode_prompt, read_prompt, sampling_line

    text = read_prompt(prompt)
    if system and not chat:
        raise InputError("--system needs --chat", hint="add --chat to use the model's chat template")
    loaded = model.load(quiet=not output.stats)  # a missing model path fails here, before torch is imported
    from llm_torch.core.engine.engine import stream_generate

    spec = sampling.generation(loaded.generation_config, max_new_tokens, truncate=truncate)
    if output.stats:
        render.info(sampling_line(spec.sampling, loaded.generation_config))
    ids = encode_prompt(loaded.tokenizer, text, chat=chat, system=system)
    mark("prompt")
    pieces, token_ids = [], []
    final = None
    for event in stream_generate(loaded.model, loaded.tokenizer, ids, spec, context=model.context):
        token_ids.extend(event.token_ids)
        if output.json:
            pieces.append(event.text)
        else:
            render.write(event.text)
            mark("write")
        if event.finish_reason:
            final = event
    if final.timings.truncated_tokens:
        render.warn(f"prompt left-truncated by {final.timings.truncated_tokens} tokens to fit the context")
    if output.json:
        from llm_torch.core.engine.events import GenerationResult

        render.write_json(GenerationResult("".join(pieces), token_ids, final.finish_reason, final.timings).to_dict())
    else:
        render.write("\n")
    if output.stats:
        render.info(render.stats_line(final.timings, str(next(loaded.model.parameters()).device)))
    if final.finish_reason == "interrupted":
        raise typer.Exit(130)
