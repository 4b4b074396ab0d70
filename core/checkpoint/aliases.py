"""User model aliases: short names for model references, kept in $XDG_CONFIG_HOME/llm-torch/aliases.json.

    {"llama": "meta-llama/Llama-2-7b-chat-hf", "mine": "/home/me/models/mine-int8", "fast": "mine"}

An alias names any reference a command takes (a Hub id, an absolute local path, a .gguf, the built-in
`smollm2`) or another alias. resolve_model expands it (user_alias) before anything else is parsed;
a local path of the same name still wins, as it does over `smollm2`. No torch import here: `llm aliases`
and shell completion read this file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llm_torch.core.errors import ConfigError, InputError
from llm_torch.core.files import atomic_write, write_error

FILE_NAME = "aliases.json"
BUILTIN_NAMES = ("smollm2",)  # core.checkpoint.resolve.EMBEDDED_MODELS (it imports this module); a test keeps them equal
# Letters, digits and . _ - : (ollama's name:tag), starting with a letter or digit: never a path
# (no / or \, no leading . or ~) and never a Hub id (those need a /).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_MAX_DEPTH = 16


def aliases_path() -> Path:
    """$XDG_CONFIG_HOME/llm-torch/aliases.json, $XDG_CONFIG_HOME defaulting to ~/.config (read per call)."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(os.path.expanduser(base)) if os.path.isabs(os.path.expanduser(base)) else Path.home() / ".config"
    return root / "llm-torch" / FILE_NAME


def looks_like_alias(text: str) -> bool:
    return bool(_NAME.fullmatch(text)) and not text.lower().endswith(".gguf")


def check_name(name: str) -> None:
    """Raise InputError unless `name` can be an alias (not a path, Hub id, .gguf or built-in name)."""
    if not looks_like_alias(name):
        raise InputError(f"'{name}' cannot be an alias name: it looks like a path, a Hub id or a .gguf file",
                         hint="use letters, digits and . _ - : (e.g. llama2-chat or llama2:7b)")
    if name.lower() in BUILTIN_NAMES:
        raise InputError(f"'{name}' is a built-in model name", hint="choose another name")


def load_aliases() -> dict[str, str]:
    """The alias file's mapping ({} when there is none). Raises ConfigError for a file that is not one."""
    path = aliases_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the aliases file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"the aliases file {path} is not valid JSON (line {e.lineno}: {e.msg})",
                          hint="fix it, or delete it to start over") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise ConfigError(f"the aliases file {path} must be one JSON object of name: reference strings",
                          hint="fix it, or delete it to start over")
    bad = [k for k in data if not looks_like_alias(k) or k.lower() in BUILTIN_NAMES]
    if bad:
        raise ConfigError(f"the aliases file {path} has an invalid alias name '{bad[0]}'",
                          hint="remove that entry (names are letters, digits and . _ - :)")
    return data


def expand(name: str, aliases: dict[str, str] | None = None) -> str:
    """Follow `name` through the aliases to the reference it finally names. Raises InputError for an
    unknown alias and ConfigError for a cycle (a hand-edited file; `set_alias` refuses to make one)."""
    aliases = load_aliases() if aliases is None else aliases
    if name not in aliases:
        raise InputError(f"unknown alias '{name}'", hint="see `llm aliases list`")
    seen = [name]
    ref = aliases[name]
    while ref in aliases:
        if ref in seen or len(seen) > _MAX_DEPTH:
            raise ConfigError(f"the aliases form a cycle: {' -> '.join(seen + [ref])}",
                              hint=f"fix it with `llm aliases set {name} REF` or `llm aliases remove {name}`")
        seen.append(ref)
        ref = aliases[ref]
    return ref


def user_alias(ref: str) -> str | None:
    """The reference the user alias `ref` names, or None when `ref` is no alias (a path, a Hub id, a
    built-in, an unknown name, or an existing local file or folder, which wins as it does over smollm2)."""
    if not looks_like_alias(ref) or ref.lower() in BUILTIN_NAMES or Path(ref).exists():
        return None
    aliases = load_aliases()
    return expand(ref, aliases) if ref in aliases else None


def set_alias(name: str, ref: str) -> str:
    """Store name -> ref and return what is stored: a local path becomes absolute (so the alias works
    from any directory). The reference must name something (an alias, a built-in, an existing path or a
    well-formed Hub id: Hub ids are not looked up, offline use stays possible)."""
    check_name(name)
    ref = ref.strip()
    aliases = load_aliases()
    if ref in aliases or ref.lower() in BUILTIN_NAMES:
        stored = ref.lower() if ref.lower() in BUILTIN_NAMES else ref
    else:
        from .hub import parse_model_ref  # raises ModelNotFoundError for a missing path or a bad Hub id

        parsed = parse_model_ref(ref)
        stored = ref if parsed.kind == "hub" else str(Path(os.path.expanduser(ref)).resolve())
    if stored == name or (stored in aliases and name in _chain(stored, aliases)):
        raise InputError(f"'{name}' -> '{ref}' would make the aliases a cycle", hint="point the alias at a model")
    aliases[name] = stored
    write_aliases(aliases)
    return stored


def remove_alias(name: str) -> str:
    """Delete an alias; returns the reference it named. Raises InputError for an unknown one."""
    aliases = load_aliases()
    if name not in aliases:
        raise InputError(f"unknown alias '{name}'", hint="see `llm aliases list`")
    ref = aliases.pop(name)
    write_aliases(aliases)
    return ref


def write_aliases(aliases: dict[str, str]) -> None:
    """Write the file atomically (temp file in the same folder, then rename): a crash leaves the old one."""
    path = aliases_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path) from None
    with atomic_write(path) as f:
        json.dump(dict(sorted(aliases.items())), f, indent=2, ensure_ascii=False)
        f.write("\n")


def _chain(name: str, aliases: dict[str, str]) -> list[str]:
    """The alias names met following `name` (stops at a non-alias or a repeat)."""
    out = []
    while name in aliases and name not in out:
        out.append(name)
        name = aliases[name]
    return out
