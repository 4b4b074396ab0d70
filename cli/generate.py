"""`llm generate`: one prompt in, streamed text (or one JSON object) out."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import options as o
from . import render


def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; piped stdin is appended after it.")] = None,
    model: o.ModelOpt = None,
    max_new_tokens: o.MaxNewTokensOpt = 256,
    temperature: o.TemperatureOpt = None,
    top_k: o.TopKOpt = None,
    top_p: o.TopPOpt = None,
    min_p: o.MinPOpt = None,
    repetition_penalty: o.RepetitionPenaltyOpt = None,
    seed: o.SeedOpt = None,
    stop: o.StopOpt = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System message (with --chat).")] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Left-truncate a prompt longer than the context.")] = False,
    dtype: o.DtypeOpt = "auto",
    device: o.DeviceOpt = "auto",
    compile: o.CompileOpt = False,
    quantize: o.QuantizeOpt = None,
    format: o.FormatOpt = o.OutputFormat.text,
    stats: o.StatsOpt = False,
    chat_template: o.ChatTemplateOpt = None,
    tp: o.TpOpt = None,
    device_map: o.DeviceMapOpt = None,
    dry_run: o.DryRunOpt = False,
) -> None:
    """Generate text from a prompt (argument and/or stdin); streams to stdout."""
    from .common import handled_before_input

    if handled_before_input(tp, model, dtype, device, device_map, dry_run):
        return
    from llm_torch.core.errors import InputError
    from llm_torch.core.engine import stream_generate
    from llm_torch.core.generate import GenerationSpec
    from llm_torch.core.sampling import sampling_spec

    from .common import encode_prompt, load, read_prompt, sampling_line, use_chat_template

    text = read_prompt(prompt)
    if system and not chat:
        raise InputError("--system needs --chat", hint="add --chat to use the model's chat template")
    loaded = load(model, dtype, device, compile=compile, quiet=not stats, quantize=quantize, tp=tp, device_map=device_map)
    sampling = sampling_spec(
        loaded.generation_config,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    spec = GenerationSpec(max_new_tokens=max_new_tokens, sampling=sampling, stop=tuple(stop or ()), truncate=truncate)
    if stats:
        render.info(sampling_line(sampling, loaded.generation_config))
    use_chat_template(loaded.tokenizer, chat_template)
    ids = encode_prompt(loaded.tokenizer, text, chat=chat, system=system)
    pieces, token_ids = [], []
    final = None
    for event in stream_generate(loaded.model, loaded.tokenizer, ids, spec):
        token_ids.extend(event.token_ids)
        if format is o.OutputFormat.text:
            render.write(event.text)
        else:
            pieces.append(event.text)
        if event.finish_reason:
            final = event
    if final.timings.truncated_tokens:
        render.warn(f"prompt left-truncated by {final.timings.truncated_tokens} tokens to fit the context")
    if format is o.OutputFormat.json:
        from llm_torch.core.generate import GenerationResult

        render.write_json(GenerationResult("".join(pieces), token_ids, final.finish_reason, final.timings).to_dict())
    else:
        render.write("\n")
    if stats:
        render.info(render.stats_line(final.timings, str(next(loaded.model.parameters()).device)))
    if final.finish_reason == "interrupted":
        raise typer.Exit(130)
