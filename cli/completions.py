"""Shell completion: the scripts in completions/ (`llm completions SHELL` prints one) and the model completer.

The scripts are Typer's: they call back into `llm` (env _LLM_COMPLETE) at completion time, so they
stay valid as commands and options change; tests/test_completions.py fails when completions/ is stale.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

PROG = "llm"
COMPLETE_VAR = "_LLM_COMPLETE"
FILES = {"bash": "llm.bash", "zsh": "_llm", "fish": "llm.fish"}


class Shell(str, Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def register_shells() -> None:
    """Typer's bash / zsh / fish completers, which answer the scripts' calls (Typer registers them only along
    with its --install-completion option, which llm leaves out)."""
    from typer._completion_classes import completion_init

    completion_init()


def completion_script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    script = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)
    return script.strip() + "\n"


def completions(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script for SHELL (see the README: Shell completions)."""
    from . import render

    render.write(completion_script(shell.value))


def complete_model(incomplete: str) -> list[str]:
    """Models in the local HF cache plus the embedded alias and the user's aliases; never raises, never
    touches the network."""
    from llm_torch.core.checkpoint.resolve import EMBEDDED_MODELS  # torch-free, like the rest of completion

    names = list(EMBEDDED_MODELS)
    try:
        from huggingface_hub import scan_cache_dir

        names.extend(sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"))
    except Exception:
        pass
    try:
        from llm_torch.core.checkpoint.aliases import load_aliases

        names.extend(sorted(load_aliases()))
    except Exception:  # a corrupt aliases file must not break completion: the command will say what is wrong
        pass
    names.extend(_local_paths(incomplete))
    return [n for n in dict.fromkeys(names) if n.startswith(incomplete)]


def _local_paths(incomplete: str, limit: int = 50) -> list[str]:
    """Folders and .gguf files when the word looks like a path (./, ../, /, ~)."""
    if not incomplete.startswith((".", "/", "~")):
        return []
    import glob
    import os

    try:
        found = []
        for path in sorted(glob.glob(os.path.expanduser(incomplete) + "*"))[:limit]:
            if os.path.isdir(path) or path.lower().endswith(".gguf"):
                shown = incomplete + path[len(os.path.expanduser(incomplete)):]
                found.append(shown + ("/" if os.path.isdir(path) else ""))
        return found
    except OSError:
        return []
