"""How a command is told its model: `-m/--model` everywhere, or the first positional argument where a command
has one (chat, serve, quantize, convert, tokenize, template, visualize-mask, perplexity, embed).

One rule: with -m, every positional argument is input; without it, the first one is the model. generate and
run take only -m: their positional argument is the prompt, and a model named there is an error that says
what to type (ollama's `run MODEL PROMPT` habit). Nothing here imports torch or touches the network.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from llm_torch.core.errors import InputError

# The shape of a Hub reference, org/name[@revision] or org/name/file.gguf (core/checkpoint/hub.py parses them).
_HUB_REF = re.compile(r"([\w.-]+)/([\w.-]+)(/[^@\s]+\.gguf)?(@\S+)?", re.IGNORECASE)
_PATH_PREFIXES = ("./", "../", "~", "/", ".\\")


def _builtin_or_alias(text: str) -> bool:
    from llm_torch.core.checkpoint.aliases import user_alias
    from llm_torch.core.checkpoint.resolve import EMBEDDED_MODELS

    return text.lower() in EMBEDDED_MODELS or user_alias(text) is not None


def _model_path(text: str, *, holding_a_model: bool = False) -> bool:
    """A .gguf file or a folder (holding_a_model: one with config.json, params.json or a .gguf file)."""
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return not holding_a_model or any((path / f).is_file() for f in ("config.json", "params.json")) or any(
            path.glob("*.gguf"))
    return path.is_file() and path.suffix.lower() == ".gguf"


def looks_like_model(text: str) -> bool:
    """Whether `text` may name a model: the built-in name, an alias, a folder or .gguf file, something written
    as a path (missing ones too: the resolver says what is wrong), or a Hub reference."""
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        return False
    if _builtin_or_alias(text) or _model_path(text):
        return True
    if Path(os.path.expanduser(text)).exists():
        return False  # an existing file that no loader opens (notes.txt): input, not a model
    return text.startswith(_PATH_PREFIXES) or "\\" in text or _HUB_REF.fullmatch(text) is not None


def names_a_model(text: str) -> bool:
    """Whether `text` surely names a model, so it cannot be a prompt: the built-in name, an alias, a model folder
    or .gguf file, or a Hub model already in the local cache."""
    text = text.strip()
    if not text or any(c.isspace() for c in text):
        return False
    if _builtin_or_alias(text) or _model_path(text, holding_a_model=True):
        return True
    m = _HUB_REF.fullmatch(text)
    if m is None:
        return False
    from llm_torch.core.checkpoint.hub import cache_root

    return (cache_root() / f"models--{m.group(1)}--{m.group(2)}").is_dir()


def one_model(option: str | None, argument: str | None, *, required: str | None = None) -> str | None:
    """The model of a command whose only positional argument is the model (chat, serve, quantize, convert):
    the argument or -m; both given must agree. `required`: the command's name when it has no default model."""
    if argument and option and argument != option:
        raise InputError(f"two models given: '{argument}' and -m '{option}'", hint="give the model once")
    model = argument or option
    if model is None and required:
        raise InputError("no model given", hint=f"name it first or with -m: llm {required} -m smollm2 ...")
    return model


def model_and_inputs(option: str | None, positional: list[str | None], *, command: str) -> tuple[str, list[str]]:
    """(model, inputs) of a command that takes MODEL then inputs (tokenize, template, visualize-mask, perplexity,
    embed): -m given, every positional argument is an input; else the first one is the model. A model written
    as a missing path fails here, before any input is read."""
    args = [a for a in positional if a is not None]
    if option is not None:
        model, inputs = option, args
    elif not args:
        raise InputError("no model given", hint=f"name it first or with -m: llm {command} -m smollm2 ...")
    else:
        model, inputs = args[0], args[1:]
        if not inputs and not looks_like_model(model):  # `llm tokenize "Hello"`: the model was left out, not mistyped
            raise InputError(f"no model given ('{model}' is not a model)",
                             hint=f"name it first or with -m: llm {command} -m smollm2 {shlex.quote(model)}")
    check_path(model)
    return model, inputs


def check_path(model: str) -> None:
    """A model written as a path that does not exist fails with the resolver's message (core.checkpoint.hub
    parses references without reading anything)."""
    text = model.strip()
    if text.startswith(_PATH_PREFIXES) or "\\" in text:
        from llm_torch.core.checkpoint.hub import parse_model_ref

        parse_model_ref(text)


def at_most_one(inputs: list[str], *, command: str, what: str) -> str | None:
    """The one TEXT of tokenize / template (-m makes every positional argument an input)."""
    if len(inputs) > 1:
        raise InputError(f"llm {command} takes one {what}, got {len(inputs)}",
                         hint=f"quote it: llm {command} -m MODEL {shlex.quote(' '.join(inputs))}")
    return inputs[0] if inputs else None


def prompt_argument(option: str | None, prompt: str | None, extra: list[str], *, command: str) -> str | None:
    """The PROMPT of generate / run (`extra`: the arguments after it): one argument. A model where the prompt goes
    (`llm run smollm2`, `llm generate smollm2 "Hello"`) is refused with the command to type instead, never taken
    as the prompt."""
    prompts = ([prompt] if prompt is not None else []) + list(extra)
    if option is None and prompts and names_a_model(prompts[0]):
        rest = " ".join(shlex.quote(p) for p in prompts[1:]) or "PROMPT"
        raise InputError(f"'{prompts[0]}' is a model, not a prompt",
                         hint=f"name the model with -m: llm {command} -m {shlex.quote(prompts[0])} {rest}")
    if len(prompts) > 1:
        raise InputError(f"llm {command} takes one prompt, got {len(prompts)} arguments",
                         hint=f"quote it: llm {command} {shlex.quote(' '.join(prompts))}")
    return prompts[0] if prompts else None
