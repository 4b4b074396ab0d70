"""Options shared by commands, declared once as groups, and the one place that maps them to specs.

A command parameter annotated with a group class (`sampling: Sampling`) is expanded by `@with_groups` into
the group's options, in place and under their own names (so `--temperature`, ctx.params["temperature"]
and the help stay as before); the body receives one group object. `group(Cls, exclude=...)` as the
parameter's default picks a subset, or adds option names (bench keeps `-t` for --threads).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from copy import copy
from dataclasses import dataclass
from typing import Any

from . import options as o


class OptionGroup:
    """Base of the group dataclasses; each field is an Annotated typer option (from cli/options.py)."""

    panel = ""  # the --help section the group's options are listed under


@dataclass(frozen=True)
class GroupChoice:
    """A command's use of a group: which of its options, and extra names or help for some of them."""

    cls: type
    exclude: tuple[str, ...] = ()
    names: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    help: dict[str, str] = dataclasses.field(default_factory=dict)


def group(cls: type, *, exclude: tuple[str, ...] = (), names: dict | None = None, help: dict | None = None) -> Any:
    return GroupChoice(cls, tuple(exclude), dict(names or {}), dict(help or {}))


def _expanded(choice: GroupChoice) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(choice.cls, include_extras=True)
    out = []
    for f in dataclasses.fields(choice.cls):
        if f.name in choice.exclude:
            continue
        base, *meta = typing.get_args(hints[f.name])
        info = copy(meta[0])  # typer's OptionInfo: copied, so a command's tweaks stay its own
        if f.name in choice.names:
            info.param_decls = tuple(info.param_decls) + choice.names[f.name]
        if f.name in choice.help:
            info.help = choice.help[f.name]
        if choice.cls.panel and not getattr(info, "rich_help_panel", None):
            info.rich_help_panel = choice.cls.panel
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                     annotation=typing.Annotated[base, info], default=f.default))
    return out


def with_groups(func):
    """Expand the OptionGroup parameters of a command into their options (see the module docstring)."""
    sig = inspect.signature(func, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: list[tuple[str, type, list[str]]] = []
    for p in sig.parameters.values():
        if isinstance(p.annotation, type) and issubclass(p.annotation, OptionGroup):
            choice = p.default if isinstance(p.default, GroupChoice) else GroupChoice(p.annotation)
            expanded = _expanded(choice)
            groups.append((p.name, p.annotation, [q.name for q in expanded]))
            params.extend(expanded)
        else:
            # Keyword-only (typer passes keywords): a group's defaults may then precede a parameter without one.
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise TypeError(f"{func.__name__}: an option of a group repeats a parameter name")

    @functools.wraps(func)
    def command(**kwargs):
        for name, cls, fields in groups:
            kwargs[name] = cls(**{f: kwargs.pop(f) for f in fields})
        return func(**kwargs)

    command.__signature__ = sig.replace(parameters=params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


# ------------------------------------------------------------------------------------------------ groups

# The Model options of commands that load one float model in one process (perplexity, embed): no split,
# compile, dry-run, chat template or quantization.
ONE_PROCESS_MODEL = ("device_map", "tp", "compile", "dry_run", "chat_template", "quantize")


@dataclass
class Sampling(OptionGroup):
    """How tokens are picked, and the texts that stop generation."""

    panel = "Sampling"
    temperature: o.TemperatureOpt = None
    top_k: o.TopKOpt = None
    top_p: o.TopPOpt = None
    min_p: o.MinPOpt = None
    repetition_penalty: o.RepetitionPenaltyOpt = None
    seed: o.SeedOpt = None
    stop: o.StopOpt = None

    def spec(self, generation_config: dict | None):
        """The SamplingSpec: these flags over the model's generation_config (None: llm's defaults only)."""
        from llm_torch.core.engine.sampling_spec import sampling_spec

        return sampling_spec(generation_config, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                             min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed)

    def generation(self, generation_config: dict | None, max_new_tokens: int, *, truncate: bool = False):
        from llm_torch.core.engine.spec import GenerationSpec

        return GenerationSpec(max_new_tokens=max_new_tokens, sampling=self.spec(generation_config),
                              stop=tuple(self.stop or ()), truncate=truncate)


@dataclass
class Output(OptionGroup):
    panel = "Output"
    format: o.FormatOpt = o.OutputFormat.text
    stats: o.StatsOpt = False

    @property
    def json(self) -> bool:
        return self.format is o.OutputFormat.json


@dataclass
class Model(OptionGroup):
    """Which model, and how and where it is loaded and run."""

    panel = "Model and device"
    model: o.ModelOpt = None
    dtype: o.DtypeOpt = "auto"
    device: o.DeviceOpt = "auto"
    device_map: o.DeviceMapOpt = None
    quantize: o.QuantizeOpt = None
    tp: o.TpOpt = None
    compile: o.CompileOpt = False
    dry_run: o.DryRunOpt = False
    chat_template: o.ChatTemplateOpt = None
    threads: o.ThreadsOpt = None
    context: o.ContextOpt = None
    kv_cache: o.KvCacheOpt = "auto"

    def with_argument(self, model_arg: str | None) -> Model:
        """The MODEL argument (chat, serve) and -m name one model; both given must agree."""
        from .model_args import one_model

        return dataclasses.replace(self, model=one_model(self.model, model_arg))

    def handled_before_input(self) -> bool:
        """True when this process's part is done before any input is read: a tensor-parallel rank > 0, or
        --dry-run (the memory plan was printed). Threads are set first: a rank computes too."""
        from .common import handled_before_input

        self.use_threads()
        return handled_before_input(self.tp, self.model, self.dtype, self.device, self.device_map, self.dry_run,
                                    context=self.context, kv_cache=self.kv_cache)

    def use_threads(self) -> None:
        if self.threads is not None:
            from llm_torch.core.openmp import set_threads

            set_threads(self.threads)

    def load(self, *, quiet: bool, tokenizer_needed: bool = False, head: str | None = None):
        """The loaded model (cli/common.py load), with --chat-template applied to its tokenizer; `head`: build
        that head instead of the checkpoint's (llm embed: "feature_extraction")."""
        from .common import load, use_chat_template

        self.use_threads()
        loaded = load(self.model, self.dtype, self.device, compile=self.compile, quiet=quiet, quantize=self.quantize,
                      tp=self.tp, device_map=self.device_map, context=self.context, head=head, kv_cache=self.kv_cache)
        if loaded.tokenizer is None and tokenizer_needed:
            from llm_torch.core.errors import InputError

            raise InputError(f"{loaded.name} has no tokenizer", hint="use a model folder with tokenizer files")
        if loaded.tokenizer is not None:
            use_chat_template(loaded.tokenizer, self.chat_template)
        return loaded
