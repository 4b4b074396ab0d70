"""`llm models` (list, --show, --rm the models a user has) and `llm aliases` (short names for them)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model


def models(
    show: Annotated[Optional[str], typer.Option("--show", metavar="MODEL", help="Print a model's config summary, chat template "
                                                "and generation config (config and tokenizer files only).",
                                                autocompletion=complete_model)] = None,
    rm: Annotated[Optional[str], typer.Option("--rm", metavar="MODEL", help="Delete a model (org/name[@revision], or an alias "
                                              "naming one) from the Hugging Face cache.", autocompletion=complete_model)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="--rm without asking.")] = False,
    format: Annotated[o.OutputFormat, typer.Option("--format", "-f", help="text (a table) or json.")] = o.OutputFormat.text,
) -> None:
    """List the models you have: the built-in one, the Hugging Face cache and your aliases."""
    from llm_torch.core.errors import InputError

    if show is not None and rm is not None:
        raise InputError("--show and --rm are separate actions", hint="give one of them")
    if yes and rm is None:
        raise InputError("--yes only goes with --rm")
    as_json = format is o.OutputFormat.json
    if show is not None:
        _show(show, as_json)
    elif rm is not None:
        _remove(rm, yes, as_json)
    else:
        _list(as_json)


def _list(as_json: bool) -> None:
    from llm_torch.core.tools.inventory import list_models

    entries = list_models()
    if as_json:
        render.write_json([e.to_dict() for e in entries])
        return
    rows = [(e.name, e.kind, e.format + (f" ({e.quantization})" if e.quantization else ""), e.model_type or "-",
             human_size(e.size_bytes), f"-> {e.target}" + (f" ({e.note})" if e.note else "") if e.target else "")
            for e in entries]
    if render.color_enabled(sys.stdout):
        from rich.table import Table

        table = Table(header_style="bold", box=None)
        for title in ("NAME", "KIND", "FORMAT", "MODEL TYPE", "SIZE", ""):
            table.add_column(title, justify="right" if title == "SIZE" else "left")
        for row in rows:
            table.add_row(*row)
        render.out_console().print(table, markup=False)
    else:  # piped: one tab-separated line per model
        render.write("".join("\t".join(row).rstrip("\t") + "\n" for row in rows))


def _show(ref: str, as_json: bool) -> None:
    from llm_torch.core.tools.inventory import show_model

    info = show_model(ref, progress=sys.stderr.isatty())
    if as_json:
        render.write_json(info)
        return
    c = info["config"]
    lines = [f"{info['name']} ({info['kind']}: {info['path']})",
             f"family          {c['model_type']} ({', '.join(c['architectures']) or 'no architectures'})",
             f"layers          {c['layers']}",
             f"hidden size     {c['hidden_size']} (MLP {c['intermediate_size']})",
             f"heads           {c['attention_heads']} attention, {c['kv_heads']} key/value, head dim {c['head_dim']}",
             f"context         {c['context']}" + (f" (sliding window {c['sliding_window']})" if c["sliding_window"] else ""),
             f"vocab           {c['vocab_size']}"]
    if c.get("rope_theta") is not None:
        lines.append(f"rope theta      {c['rope_theta']:g}")
    lines.append(f"tied embeddings {'yes' if c['tie_word_embeddings'] else 'no'}")
    if c.get("dtype"):
        lines.append(f"dtype           {c['dtype']}")
    if c.get("quantization"):
        lines.append(f"quantization    {c['quantization']}")
    if c.get("labels"):
        lines.append(f"labels          {', '.join(c['labels'])}")
    template = info["chat_template"]
    lines.append("")
    if template["template"]:
        lines += [f"chat template (from {template['source']}):", template["template"].rstrip("\n")]
    else:
        lines.append("chat template: none (chat commands need --chat-template)")
    lines.append("")
    generation = info["generation_config"]
    if generation:
        import json

        lines.append("generation config:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in generation.items()]
    else:
        lines.append("generation config: none (greedy unless flags say otherwise)")
    render.write("\n".join(lines) + "\n")


def _remove(ref: str, yes: bool, as_json: bool) -> None:
    from llm_torch.core.errors import InputError
    from llm_torch.core.tools.inventory import plan_removal

    plan = plan_removal(ref)
    what = f"{plan.repo_id} ({len(plan.revisions)} revision{'s' if len(plan.revisions) != 1 else ''}, {human_size(plan.freed_bytes)})"
    if not yes:
        if not sys.stdin.isatty():
            raise InputError(f"not deleting {what} without confirmation (stdin is not a terminal)", hint="add --yes")
        if not typer.confirm(f"delete {what} from the Hugging Face cache?", default=False, err=True):
            render.info("nothing deleted")
            raise typer.Exit(1)
    plan.execute()
    if as_json:
        render.write_json({"deleted": plan.repo_id, "revisions": plan.revisions, "freed_bytes": plan.freed_bytes})
    else:
        render.write(f"deleted {what}\n")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------------------------------ llm aliases

aliases_app = typer.Typer(
    name="aliases", no_args_is_help=False, pretty_exceptions_enable=False,
    help="Short names for models, usable wherever a model is taken (as in Simon Willison's llm: llm aliases set NAME MODEL).",
)


@aliases_app.callback(invoke_without_command=True)
def aliases_root(ctx: typer.Context) -> None:
    """Short names for models, kept in $XDG_CONFIG_HOME/llm-torch/aliases.json. Alone: the list."""
    if ctx.invoked_subcommand is None:
        aliases_list()


@aliases_app.command("set")
def aliases_set(
    name: Annotated[str, typer.Argument(help="The alias: letters, digits and . _ - : (e.g. llama2:7b).")],
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Hub id, local folder or .gguf (stored as an absolute path), "
                                         "smollm2 or another alias.", autocompletion=complete_model)],
) -> None:
    """Make NAME stand for MODEL in every command (replaces an existing NAME)."""
    from llm_torch.core.checkpoint.aliases import set_alias

    stored = set_alias(name, model)
    render.info(f"{name} -> {stored}")


@aliases_app.command("remove")
def aliases_remove(name: Annotated[str, typer.Argument(help="The alias to remove.", autocompletion=complete_model)]) -> None:
    """Remove an alias (the model it names stays where it is)."""
    from llm_torch.core.checkpoint.aliases import remove_alias

    ref = remove_alias(name)
    render.info(f"removed {name} (was {ref})")


@aliases_app.command("list")
def aliases_list(
    format: Annotated[o.OutputFormat, typer.Option("--format", "-f", help="text (NAME: MODEL lines) or json (one object).")] = o.OutputFormat.text,
) -> None:
    """The aliases and the models they name."""
    from llm_torch.core.checkpoint.aliases import load_aliases

    aliases = load_aliases()
    if format is o.OutputFormat.json:
        render.write_json(aliases)
    else:
        render.write("".join(f"{name}: {ref}\n" for name, ref in sorted(aliases.items())))


@aliases_app.command("path")
def aliases_path() -> None:
    """The aliases file's path."""
    from llm_torch.core.checkpoint.aliases import aliases_path as path

    render.write(f"{path()}\n")
