"""Typer wiring only. main() is the one place that turns errors into exit codes.

Heavy imports (torch) happen inside command bodies so `llm --help` stays instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from . import bench as bench_cmd
from . import chat as chat_cmd
from . import completions as completions_cmd
from . import convert as convert_cmd
from . import embed as embed_cmd
from . import generate as generate_cmd
from . import models as models_cmd
from . import perplexity as perplexity_cmd
from . import quantize as quantize_cmd
from . import run as run_cmd
from . import serve as serve_cmd
from . import template as template_cmd
from . import tokenize as tokenize_cmd
from . import visualize as visualize_cmd
from .suggest import CommandGroup

app = typer.Typer(
    name="llm",
    cls=CommandGroup,
    help="Run Llama, Llama 2 and Gemma 2 models locally with pure-PyTorch model code.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # One completion mechanism: `llm completions SHELL` (cli/completions.py), not Typer's --install-completion.
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from . import render

        render.write(f"llm-torch {version('llm-torch')}\n")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Run Llama, Llama 2 and Gemma 2 models locally with pure-PyTorch model code."""


app.command("generate", context_settings=generate_cmd.CONTEXT_SETTINGS)(generate_cmd.generate)
app.command("chat")(chat_cmd.chat)
app.command("bench")(bench_cmd.bench)
app.command("run", context_settings=run_cmd.CONTEXT_SETTINGS)(run_cmd.run)
app.command("serve")(serve_cmd.serve)
app.command("quantize")(quantize_cmd.quantize)
app.command("visualize-mask")(visualize_cmd.visualize_mask)
app.command("tokenize")(tokenize_cmd.tokenize)
app.command("convert")(convert_cmd.convert)
app.command("perplexity")(perplexity_cmd.perplexity)
app.command("template")(template_cmd.template)
app.command("models")(models_cmd.models)
app.add_typer(models_cmd.aliases_app, name="aliases")
app.command("embed")(embed_cmd.embed)
app.command("completions")(completions_cmd.completions)


def main() -> None:
    """Entry point: one handler for every error, Ctrl-C and closed pipes."""
    from llm_torch.core.openmp import tune_openmp

    tune_openmp()  # before anything loads torch
    from . import render
    from .completions import COMPLETE_VAR, register_shells

    if COMPLETE_VAR in os.environ:  # a completion script calling back (completions/)
        register_shells()

    abort, usage, exit_ = _click_exceptions()

    debug = bool(os.environ.get("LLM_DEBUG"))
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except KeyboardInterrupt:
        _flush_quietly()
        sys.exit(130)
    except (BrokenPipeError, render.OutputClosed):
        _silence_stdout()
        sys.exit(0)
    except abort:
        sys.exit(130)
    except usage as e:
        e.show()
        sys.exit(e.exit_code)
    except exit_ as e:
        sys.exit(e.exit_code)
    except Exception as e:  # the one handler: typed errors get their message, others a short line
        if debug:
            raise
        from llm_torch.core.errors import LLMError

        if isinstance(e, LLMError):
            render.error(e.message, e.hint)
            sys.exit(e.exit_code)
        if isinstance(e, MemoryError):
            render.error("out of memory", "try a smaller model, --dtype bfloat16 or a quantized model")
            sys.exit(1)
        render.error(f"{type(e).__name__}: {e}", "set LLM_DEBUG=1 to see the traceback")
        sys.exit(1)


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Abort, ClickException, Exit) classes: click's, plus the usage errors recent typer vendors as
    typer._click and raises instead (a bad option would otherwise reach the catch-all handler)."""
    import click.exceptions as ce

    modules = [ce]
    try:
        import typer._click.exceptions as vendored

        modules.append(vendored)
    except ImportError:
        pass
    return tuple(tuple(getattr(m, n) for m in modules if hasattr(m, n)) for n in ("Abort", "ClickException", "Exit"))


def _silence_stdout() -> None:
    # The reader went away (`| head`): point stdout at devnull so the interpreter's final flush is quiet.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
