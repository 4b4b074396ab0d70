"""`llm template`: the prompt a model's chat template makes of some messages, and where generation stops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model


def template(
    model_arg: Annotated[Optional[str], typer.Argument(metavar="MODEL", help="Local folder, .gguf file, Hub id or alias "
                                                       "(config and tokenizer files only); or -m.",
                                                       autocompletion=complete_model)] = None,
    text: Annotated[Optional[str], typer.Argument(metavar="TEXT", help="A user message (default: 'Hello!').")] = None,
    model: o.NamedModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System message.")] = None,
    messages: Annotated[
        Optional[Path], typer.Option("--messages", help="A JSON file of messages ([{role, content}, ...] or {\"messages\": [...]}).", dir_okay=False)
    ] = None,
    generation_prompt: Annotated[
        bool, typer.Option("--generation-prompt/--no-generation-prompt", help="End with the assistant's turn opening (add_generation_prompt).")
    ] = True,
    chat_template: o.ChatTemplateOpt = None,
    format: Annotated[o.OutputFormat, typer.Option("--format", "-f", help="text (the prompt) or json.")] = o.OutputFormat.text,
) -> None:
    """Print the prompt the chat template renders for messages, and the tokens that end generation."""
    import sys

    from llm_torch.core.errors import InputError

    from llm_torch.core.checkpoint import open_checkpoint, resolve_model

    from .common import chat_messages, use_chat_template
    from .model_args import at_most_one, model_and_inputs

    model, inputs = model_and_inputs(model, [model_arg, text], command="template")
    text = at_most_one(inputs, command="template", what="TEXT")
    if messages is not None and (text or system):
        raise InputError("--messages holds the whole conversation", hint="drop TEXT and --system")
    source = open_checkpoint(resolve_model(model, progress=sys.stderr.isatty(), weights=False))
    tokenizer = source.tokenizer()
    use_chat_template(tokenizer, chat_template)
    conversation = _read_messages(messages) if messages is not None else chat_messages(tokenizer, text or "Hello!", system)
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    stops = list(dict.fromkeys([*source.config.eos_token_ids, *tokenizer.eos_token_ids]))
    stop_tokens = [{"id": i, "token": tokenizer.id_to_token(i)} for i in stops]
    if format is o.OutputFormat.json:
        render.write_json({"prompt": prompt, "tokens": len(ids), "stop_tokens": stop_tokens})
        return
    render.write(prompt if prompt.endswith("\n") else prompt + "\n")
    render.info(f"{len(ids)} tokens; generation stops at: "
                + (", ".join(f"{t['token']} ({t['id']})" for t in stop_tokens) or "no EOS token (max tokens only)"))


def _read_messages(path: Path) -> list[dict[str, str]]:
    from llm_torch.core.errors import InputError

    try:
        data = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not JSON: {e}") from None
    data = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(data, list) or not data or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in data):
        raise InputError(f"{path}: expected a non-empty list of {{\"role\", \"content\"}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in data]
