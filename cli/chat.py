"""`llm chat`: talk to a model. Interactive on a terminal; one turn per input line when stdin is not one.

The conversation itself (template, KV cache reuse, overflow, save/load) lives in core/chat.py; this module
reads input, runs the in-chat commands and renders answers (Markdown on a terminal, plain text otherwise).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .option_groups import Model, Output, Sampling, group, with_groups

PROMPT = ">>> "
MORE = "... "
MULTI_END = "/end"
COMMANDS = ("/help", "/clear", "/system", "/set", "/status", "/regen", "/undo", "/save", "/load", "/multi",
            "/exit", "/quit")
HELP = f"""\
/help               this help
/clear              start a new conversation (system prompt and settings stay)
/system [TEXT]      set the system prompt; no TEXT shows it, '/system -' removes it
/set [KEY VALUE]    change a setting (no arguments: show them): temperature, top_p, top_k, min_p,
                    max_new_tokens, repetition_penalty, seed ('none' for a random seed)
/status             model, settings, and how much of the context the conversation uses
/regen              answer the last message again
/undo               remove the last exchange (your message and its answer)
/save FILE          save the conversation and settings as JSON (resume with /load or --resume)
/load FILE          load a conversation saved with /save
/multi              type a message over several lines; a line holding only {MULTI_END} sends it
/exit               quit (also /quit, Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while the model answers stops the answer; the part already written stays in the conversation.
A message that starts with '/' but is not a command: start it with '//' (sent as '/...')."""


@with_groups
def chat(
    ctx: typer.Context,
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="[MODEL]", help="The model (same forms as -m); default: smollm2.", autocompletion=o.complete_model)
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
    if model.handled_before_input():
        return
    if system is not None and system_file is not None:
        raise InputError("--system and --system-file both given", hint="use one of them")
    if system_file is not None:
        system = _read_text(system_file)
    interactive = sys.stdin.isatty()
    from llm_torch.core.chat_settings import ChatSettings

    from .common import sampling_line

    if base_url is not None:
        from llm_torch.core.remote_chat import RemoteChatSession

        local_only = [f"--{k.replace('_', '-')}" for k in LOCAL_ONLY_FLAGS if _from_command_line(ctx, k)]
        if local_only:
            raise InputError(f"{', '.join(local_only)} cannot apply to a model on a server", hint="drop them with --base-url")
        settings = ChatSettings(max_new_tokens=max_new_tokens or 1, sampling=sampling.spec(None))
        session = RemoteChatSession(base_url, api_key=api_key, model=model.model, system=system, settings=settings)
        where = session.base
    else:
        from llm_torch.core.chat import ChatSession

        loaded = model.load(quiet=not (interactive or output.stats))
        settings = ChatSettings(max_new_tokens=max_new_tokens or 1, sampling=sampling.spec(loaded.generation_config))
        session = ChatSession(loaded.model, loaded.tokenizer, model_name=loaded.name, settings=settings, system=system,
                              context=model.context)
        where = f"{loaded.dtype_name}, {_device(loaded.model)}"
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


SETTING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
# What a model on a server cannot take from the command line (it is loaded and run there).
LOCAL_ONLY_FLAGS = ("dtype", "device", "compile", "quantize", "threads", "context")


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


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "llm-torch" / "chat_history"


class Repl:
    """The read-answer loop. Interactive: prompts, line editing, Markdown answers, errors that do not end
    the session. Scripted (stdin not a terminal): no prompts, plain answers one per turn, errors end it."""

    def __init__(self, session, where: str, *, interactive: bool, stats: bool):
        self.session = session
        self.where = where  # dtype and device, or the server's URL
        self.interactive = interactive
        self.stats = stats
        self.markdown = interactive and render.color_enabled(sys.stdout)
        self._readline = None

    # ---- input ---------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.interactive:
            self._setup_readline()
            render.info(f"chatting with {self.session.model_name}: /help for commands, /exit or Ctrl-D to quit")
        try:
            return self._loop()
        finally:
            self._save_history()

    def _loop(self) -> int:
        from llm_torch.core.errors import LLMError

        while True:
            try:
                line = self._read(PROMPT)
            except EOFError:
                self._end_prompt_line()
                return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self._end_prompt_line()
                return 0
            try:
                if not self._handle(line):
                    return 0
            except LLMError as e:
                if not self.interactive:
                    raise
                render.error(e.message, e.hint)
            except _Interrupted:
                if not self.interactive:
                    return 130
            except KeyboardInterrupt:  # during a command: cancel it, the session goes on
                if not self.interactive:
                    raise
                render.info("(cancelled)")

    def _read(self, prompt: str) -> str:
        if not self.interactive:
            raw = sys.stdin.buffer.readline()
            if not raw:
                raise EOFError
            try:
                return raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                from llm_torch.core.errors import InputError

                raise InputError(f"stdin is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
                                 hint="convert the input to UTF-8, e.g. with iconv") from None
        if sys.stdout.isatty():
            if self.markdown:  # readline needs the colour codes marked as zero-width
                prompt = f"\001\033[1;32m\002{prompt}\001\033[0m\002"
            return input(prompt)
        render.prompt(prompt)  # stdout is a file or pipe: keep prompts out of it
        return input()

    def _end_prompt_line(self) -> None:
        if self.interactive:
            render.prompt("\n")

    def _read_multi(self) -> str | None:
        lines = []
        while True:
            try:
                line = self._read(MORE)
            except EOFError:
                break
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self._end_prompt_line()
                self.say("(multi-line message cancelled)")
                return None
            if line.strip() == MULTI_END:
                break
            lines.append(line)
        return "\n".join(lines)

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # no line editing on this platform (e.g. Windows without pyreadline)
            return
        self._readline = readline
        path = history_path()
        try:
            readline.read_history_file(path)
        except (FileNotFoundError, OSError):
            pass
        readline.set_history_length(1000)
        readline.set_completer_delims(" \t\n")
        readline.set_completer(_complete)
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _save_history(self) -> None:
        if self._readline is None:
            return
        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(path)
        except OSError as e:
            render.warn(f"could not save the input history to {path}: {e.strerror or e}")

    # ---- commands ------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """Command output: the screen (stdout) when interactive, stderr in scripts (stdout is answers only)."""
        if self.interactive:
            render.write(text + "\n")
        else:
            render.info(text)

    def _handle(self, line: str) -> bool:
        """One input line; -> False to end the session."""
        from llm_torch.core.errors import InputError

        stripped = line.strip()
        if not stripped:
            return True
        if stripped.startswith("//"):
            return self._turn(lambda: self.session.send(line.lstrip()[1:]))
        if not stripped.startswith("/"):
            return self._turn(lambda: self.session.send(line))
        name, _, arg = stripped.partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/clear":
            self.session.clear()
            self.say("new conversation")
        elif name == "/system":
            self._system(arg)
        elif name == "/set":
            self._set(arg)
        elif name == "/status":
            self._status()
        elif name == "/regen":
            return self._turn(self.session.regenerate)
        elif name == "/undo":
            text = self.session.undo()
            self.say(f"removed: {_clip(text, 60)}")
        elif name == "/save":
            if not arg:
                raise InputError("/save needs a file name", hint="/save chat.json")
            path = self.session.save(arg)
            self.say(f"saved {len(self.session.messages)} messages to {path}")
        elif name == "/load":
            if not arg:
                raise InputError("/load needs a file name", hint="/load chat.json")
            self.load(arg)
        elif name == "/multi":
            text = self._read_multi()
            if text is not None and text.strip():
                return self._turn(lambda: self.session.send(text))
        else:
            raise InputError(f"unknown command {name}", hint="/help lists the commands; start a message with // to send '/'")
        return True

    def _system(self, arg: str) -> None:
        if not arg:
            self.say(f"system prompt: {self.session.system}" if self.session.system else "no system prompt")
            return
        self.session.set_system(None if arg == "-" else arg)
        self.say("system prompt removed" if arg == "-" else "system prompt set")

    def _set(self, arg: str) -> None:
        from llm_torch.core.errors import InputError

        if not arg:
            self.say(_settings_line(self.session.settings.as_dict()))
            return
        key, _, value = arg.partition(" ")
        if not value.strip():
            raise InputError(f"/set {key} needs a value", hint="e.g. /set temperature 0.7")
        parsed = self.session.set(key, value.strip())
        self.say(f"{key.lower().replace('-', '_')} = {parsed}")

    def _status(self) -> None:
        s = self.session.status()
        used = s["context_used"]
        context = (f"context: {used} of {s['context']} tokens used ({100 * used / s['context']:.0f}%)" if s["context"]
                   else f"context: {used} tokens used (the server's limit is not known)")
        lines = [
            f"model: {s['model']} ({self.where})",
            f"system prompt: {_clip(s['system'], 70) if s['system'] else '(none)'}"
            + (" (folded into the first message)" if s["system_folded"] else ""),
            f"messages: {s['messages']}" + (f" ({s['dropped_messages']} dropped from the context)" if s["dropped_messages"] else ""),
            context,
            f"settings: {_settings_line(s['settings'])}",
        ]
        self.say("\n".join(lines))

    def load(self, path: str, *, quiet: bool = False) -> None:
        data = self.session.load(path)
        saved_model, name = data.get("model"), self.session.model_name
        if saved_model and saved_model != name:
            render.warn(f"{path} was saved with model '{saved_model}'; continuing with '{name}'")
        if not quiet:
            self.say(f"loaded {len(self.session.messages)} messages from {path}")

    # ---- answers -------------------------------------------------------------------------------------

    def _turn(self, start) -> bool:
        """Run one answer. Ctrl-C stops it and keeps what was written (raises _Interrupted in scripts)."""
        from llm_torch.core.chat import ChatNotice

        turn = None
        view = self._view()
        interrupted = False
        try:
            turn = start()
            with view:
                for event in turn:
                    if isinstance(event, ChatNotice):
                        (render.warn if event.kind == "context_trimmed" else render.info)(event.message)
                        continue
                    view.add(event.text)
                    if event.finish_reason == "interrupted":
                        interrupted = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if turn is not None:
                turn.close()  # keeps the partial answer, or undoes a turn that had not started
        info = self.session.last_turn
        if interrupted:
            render.info("(interrupted)")
        elif self.interactive and info is not None and info.finish_reason == "length":
            render.info(f"(stopped after {info.timings.completion_tokens} tokens: /set max_new_tokens to allow more)")
        if self.stats and info is not None:
            render.info(render.stats_line(info.timings) + f" | reused {info.reused_tokens} tok | "
                        f"context {self.session.cached_tokens}/{self.session.context or '?'}")
        if interrupted and not self.interactive:
            raise _Interrupted
        return True

    def _view(self):
        if not self.markdown:
            return _PlainView()
        return _MarkdownView(render.out_console())


class _Interrupted(Exception):
    """Ctrl-C during an answer in a script: the run ends with 130 after the partial answer."""


class _PlainView:
    """Text as it comes, flushed piece by piece; a newline ends the answer."""

    def __enter__(self):
        return self

    def add(self, text: str) -> None:
        render.write(text)

    def __exit__(self, *exc) -> None:
        render.write("\n")


class _MarkdownView:
    """Markdown re-rendered live as the answer grows. Redraws are spaced by what they cost, so a long answer
    spends its time generating, not re-rendering; the final, complete render happens on exit."""

    def __init__(self, console):
        self.console = console
        self.text = ""
        self.live = None
        self.last = 0.0
        self.interval = 0.05

    def __enter__(self):
        from rich.live import Live
        from rich.text import Text

        self.live = Live(Text("…", style="dim"), console=self.console, auto_refresh=False,
                         vertical_overflow="ellipsis")
        self.live.start(refresh=True)
        return self

    def add(self, text: str) -> None:
        self.text += text
        now = time.perf_counter()
        if text and now - self.last >= self.interval:
            self._draw()
            self.last = time.perf_counter()
            self.interval = max(0.05, 4 * (self.last - now))

    def _draw(self) -> None:
        from rich.markdown import Markdown

        self.live.update(Markdown(markdown_source(self.text)), refresh=True)

    def __exit__(self, *exc) -> None:
        from rich.markdown import Markdown

        self.live.update(Markdown(markdown_source(self.text)))
        self.live.stop()


_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_TAG = re.compile(r"<(/?[A-Za-z_][\w-]*)>")


def markdown_source(text: str) -> str:
    """Model text as Markdown that shows what the model wrote: a single newline stays a line break (Markdown
    would join the lines), and tag-like words such as <think> are shown, not swallowed as HTML. Code blocks
    and `code spans` are left alone."""
    out, in_code = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_code = not in_code
            out.append(line)
        elif in_code:
            out.append(line)
        else:
            parts = line.split("`")
            parts[0::2] = [_TAG.sub(r"\\<\1\\>", p) for p in parts[0::2]]
            out.append("`".join(parts) + ("  " if line.strip() else ""))
    return "\n".join(out)


def _complete(text: str, state: int) -> str | None:
    matches = [c + " " for c in COMMANDS if c.startswith(text)] if text.startswith("/") else []
    return matches[state] if state < len(matches) else None


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _device(model) -> str:
    return str(next(model.parameters()).device)
