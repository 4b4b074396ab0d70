"""`llm chat`: talk to a model. Interactive on a terminal; one turn per input line when stdin is not one.

The conversation itself (template, KV cache reuse, overflow, save/load) lives in core/tasks/chat.py and
core/tasks/conversation.py; cli/chat_repl.py reads input and runs the in-chat commands, cli/chat_view.py renders
answers (Markdown on a terminal, plain text otherwise). This module is the command and its options.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .chat_repl import Repl
from .option_groups import Model, Output, Sampling, group, with_groups


@with_groups
def chat(
    ctx: typer.Context,
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="MODEL", help="The model (same forms as -m); default: smollm2.", autocompletion=o.complete_model)
    ] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")] = None,
    system_file: Annotated[
        Optional[Path], typer.Option("--system-file", help="Read the system prompt from a file.", dir_okay=False)
    ] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue a conversation saved with /save.", dir_okay=False)
    ] = None,
    max_new_tokens: o.MaxNewTokensOpt = 512,
    base_url: Annotated[
        Optional[str], typer.Option("--base-url", help="Chat with an OpenAI-compatible server instead (llm serve, llama-server, ollama): e.g. http://127.0.0.1:8000/v1.")
    ] = None,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", envvar="LLM_API_KEY", help="API key for --base-url (env LLM_API_KEY).")
    ] = None,
    sampling: Sampling = group(Sampling, exclude=("stop",)),
    model: Model = None,
    output: Output = group(Output, exclude=("format",)),
) -> None:
    """Chat with a model: interactive on a terminal (/help lists the commands), one message per input line otherwise.

    With stdin from a pipe or a file, each line is one user message and each answer is written to stdout,
    ended by a newline; the command exits at the end of the input."""
    from llm_torch.core.errors import InputError

    model = model.with_argument(model_arg)
    if base_url is not None:  # before any local work (--dry-run, --tp) could start on a model it does not run
        local_only = [f"--{k.replace('_', '-')}" for k in LOCAL_ONLY_FLAGS if _from_command_line(ctx, k)]
        if local_only:
            raise InputError(f"{', '.join(local_only)} cannot apply to a model on a server", hint="drop them with --base-url")
    elif model.handled_before_input():
        return
    if system is not None and system_file is not None:
        raise InputError("--system and --system-file both given", hint="use one of them")
    if system_file is not None:
        system = _read_text(system_file)
    interactive = sys.stdin.isatty()
    from llm_torch.core.tasks.chat_settings import ChatSettings

    from .common import sampling_line

    if base_url is not None:
        from llm_torch.core.tasks.remote_chat import RemoteChatSession

        settings = ChatSettings(max_new_tokens=max_new_tokens or 1, sampling=sampling.spec(None))
        session = RemoteChatSession(base_url, api_key=api_key, model=model.model, system=system, settings=settings)
        where = session.base
    else:
        loaded = model.load(quiet=not (interactive or output.stats))
        from llm_torch.core.tasks.chat import ChatSession

        settings = ChatSettings(max_new_tokens=max_new_tokens or 1, sampling=sampling.spec(loaded.generation_config))
        session = ChatSession(loaded.model, loaded.tokenizer, model_name=loaded.name, settings=settings, system=system,
                              context=model.context)
        quantized = f"{loaded.quantization} quantized, " if loaded.quantization else ""
        where = f"{quantized}{loaded.dtype_name}, {_device(loaded.model)}"
        if output.stats:
            render.info(sampling_line(settings.sampling, loaded.generation_config))
    repl = Repl(session, where, interactive=interactive, stats=output.stats)
    if resume is not None:
        repl.load(str(resume), quiet=not interactive)
        # What the command line says wins over the file.
        if system is not None:
            session.set_system(system)
        given = {k: ctx.params[k] for k in SETTING_FLAGS if _from_command_line(ctx, k)}
        session.settings = session.settings.with_values(given)
    code = repl.run()
    if code:
        raise typer.Exit(code)


# The settings a saved conversation carries, which the command line overrides on --resume.
SETTING_FLAGS = ("max_new_tokens", *(f.name for f in dataclasses.fields(Sampling) if f.name != "stop"))
# What a model on a server cannot take from the command line (it is loaded and run there).
LOCAL_ONLY_FLAGS = tuple(f.name for f in dataclasses.fields(Model) if f.name != "model")


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # an enum of click's (or of the click typer bundles)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT")


def _read_text(path: Path) -> str:
    from llm_torch.core.errors import InputError

    try:
        return path.expanduser().read_text(encoding="utf-8").rstrip("\n")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not valid UTF-8", hint="convert it to UTF-8, e.g. with iconv") from None


def _device(model) -> str:
    return str(next(model.parameters()).device)
