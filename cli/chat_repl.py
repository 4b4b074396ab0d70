"""The read-answer loop of `llm chat`: input (readline history and completion on a terminal, lines from a
pipe otherwise), the in-chat /commands, and each answer's rendering and Ctrl-C handling."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from . import render
from .chat_view import MarkdownView, PlainView

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
/exit               quit (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while the model answers stops the answer; the part already written stays in the conversation.
A message that starts with '/' but is not a command: start it with '//' (sent as '/...')."""
QUIT_HINT = "(Ctrl-C again to quit; /exit or Ctrl-D also quit)"


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

        armed = False  # Ctrl-C was pressed at the prompt: one more in a row quits
        while True:
            try:
                line = self._read(PROMPT)
            except EOFError:
                self._end_prompt_line()
                return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                try:
                    armed = self._interrupted_at_prompt(armed)
                except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
                    armed = None
                if armed is None:
                    return 0
                continue
            armed = False
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

    def _interrupted_at_prompt(self, armed: bool) -> bool | None:
        """Ctrl-C at the prompt drops what was typed; on an empty line it warns, and a second one in a row
        quits (-> None). A Ctrl-C meant to stop an answer that had just ended lands here: the conversation
        stays, as in ollama, while the Ctrl-C Ctrl-C that quits llama-cli still quits."""
        self._end_prompt_line()
        if self._readline is not None and self._readline.get_line_buffer().strip():
            return False
        if armed:
            return None
        render.info(QUIT_HINT)
        return True

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
        from llm_torch.core.tasks.chat import ChatNotice

        turn = None
        view = self._view()
        interrupted = False
        try:
            turn = start()
            with keys_unechoed(self.interactive), view:
                for event in turn:
                    if isinstance(event, ChatNotice):
                        say = render.warn if event.kind == "context_trimmed" else render.info
                        view.above(lambda: say(event.message))
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
            return PlainView()
        return MarkdownView(render.out_console())


@contextmanager
def keys_unechoed(interactive: bool):
    """While an answer streams the terminal neither echoes keys (they would land inside the answer and throw
    off the rows the view redraws) nor drops its queues on Ctrl-C (NOFLSH: by default the interrupt discards
    output not yet shown, which can cut a redraw in half). What was typed stays queued for the next prompt,
    where readline shows it."""
    try:
        import termios
    except ImportError:  # Windows: no terminal modes to change
        termios = None
    saved = None
    if termios is not None and interactive:
        fd = sys.stdin.fileno()
        try:
            saved = termios.tcgetattr(fd)
        except (termios.error, OSError, ValueError):
            saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~termios.ECHO) | termios.NOFLSH  # lflag; without ECHO no "^C" is echoed either
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


class _Interrupted(Exception):
    """Ctrl-C during an answer in a script: the run ends with 130 after the partial answer."""


def _complete(text: str, state: int) -> str | None:
    matches = [c + " " for c in COMMANDS if c.startswith(text)] if text.startswith("/") else []
    return matches[state] if state < len(matches) else None


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _settings_line(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())
