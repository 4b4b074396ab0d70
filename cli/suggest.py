"""What `llm` says to a command it does not have: the closest of its commands, or, for the verbs of ollama
(whose users type them here first), what llm does instead."""

from __future__ import annotations

import difflib

from typer.core import TyperGroup

INSTEAD = {
    "pull": "models are not pulled: a Hub id (org/name, or org/name/file.gguf) is downloaded on first use, "
            "e.g. `llm chat org/name`; a local path or an alias (`llm aliases set`) works too, and `llm models` "
            "lists what you have",
    "list": "use `llm models`",
    "ls": "use `llm models`",
    "show": "use `llm models --show MODEL`",
    "rm": "use `llm models --rm MODEL`",
    "ps": "no model stays loaded between commands: each loads its own, and `llm serve MODEL` keeps one loaded "
          "for clients",
    "cp": "use `llm aliases set NAME MODEL` (a second name for a model, no copy)",
}


def unknown_command(name: str, commands: list[str]) -> str:
    """The message for `llm NAME` when NAME is no command."""
    if name in INSTEAD:
        return f"No such command '{name}': {INSTEAD[name]}."
    close = difflib.get_close_matches(name, commands, n=3, cutoff=0.6)
    if close:
        return f"No such command '{name}'. Did you mean {' or '.join(repr(c) for c in close)}?"
    return f"No such command '{name}'. Commands: {', '.join(commands)}."


class CommandGroup(TyperGroup):
    """The root group: an unknown command gets unknown_command's message (Typer's own suggestion depends on
    its version)."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            ctx.fail(unknown_command(name, self.list_commands(ctx)))
        return super().resolve_command(ctx, args)
