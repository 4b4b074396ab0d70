"""Typer wiring only. main() is the one place that turns errors into exit codes.

Heavy imports (torch) happen inside command bodies so `llm --help` stays instant. A command's module is
imported, and its click command built, only when that command runs: `llm chat` builds one command, not all
of them (`llm --help`, shell completion and an unknown name register every one).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from typing import Annotated, Optional

import typer

from .suggest import CommandGroup

# name -> (module of cli/, its command function or Typer app), in the order `llm --help` lists them.
COMMANDS = {
    "generate": ("generate", "generate"),
    "chat": ("chat", "chat"),
    "bench": ("bench", "bench"),
    "run": ("run", "run"),
    "serve": ("serve", "serve"),
    "quantize": ("quantize", "quantize"),
    "visualize-mask": ("visualize", "visualize_mask"),
    "tokenize": ("tokenize", "tokenize"),
    "convert": ("convert", "convert"),
    "perplexity": ("perplexity", "perplexity"),
    "template": ("template", "template"),
    "models": ("models", "models"),
    "aliases": ("models", "aliases_app"),
    "embed": ("embed", "embed"),
    "completions": ("completions", "completions"),
}


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from . import render

        render.write(f"llm-torch {version('llm-torch')}\n")
        raise typer.Exit()


def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Run Llama, Llama 2 and Gemma 2 models locally with pure-PyTorch model code."""


def make_app(names: Iterable[str] = COMMANDS) -> typer.Typer:
    """The `llm` app with the commands `names` (default: all of them)."""
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
    app.callback()(root)
    for name in names:
        module_name, attr = COMMANDS[name]
        module = importlib.import_module(f"{__package__}.{module_name}")
        command = getattr(module, attr)
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=name)
        else:  # CONTEXT_SETTINGS: generate and run take the arguments after their prompt themselves
            app.command(name, context_settings=getattr(module, "CONTEXT_SETTINGS", None))(command)
    return app


def __getattr__(name: str):
    # `app`, with every command, for whoever imports it (typer.testing in the tests); main() builds its own.
    if name == "app":
        globals()["app"] = app = make_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point: one handler for every error, Ctrl-C and closed pipes."""
    from llm_torch.core.openmp import tune_openmp

    tune_openmp()  # before anything loads torch
    from llm_torch.core.phases import mark

    mark("cli import")
    from . import render
    from .completions import COMPLETE_VAR, register_shells

    if COMPLETE_VAR in os.environ:  # a completion script calling back (completions/)
        register_shells()

    abort, usage, exit_ = _click_exceptions()

    debug = bool(os.environ.get("LLM_DEBUG"))
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    app = make_app([name] if name in COMMANDS and COMPLETE_VAR not in os.environ else COMMANDS)
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
    finally:
        _write_phases()


def _write_phases() -> None:
    """LLM_PHASES=FILE: the start-up phase marks (core/phases.py), one JSON line each, for benchmarks/startup.py."""
    path = os.environ.get("LLM_PHASES")
    if not path:
        return
    import json

    from llm_torch.core.phases import marks

    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"phase": name, "t": t, "cpu": cpu, "rss": rss, "peak": peak}) + "\n"
                     for name, t, cpu, rss, peak in marks())


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
