"""Swap a float model's Linear layers for quantized ones, in place, one layer at a time.

Every scheme's codec turns one Linear (its module path is its checkpoint name, e.g.
`model.layers.0.self_attn.q_proj`) into checkpoint tensors, and those tensors into one module. The
in-memory path and the reload path both go through `codec.build` on the same tensors, so a saved
and reloaded model computes exactly what the model quantized in memory computes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .spec import QuantSpec, scheme_label


def codec_for(spec_or_scheme, group_size: int = 128, double_quant: bool = False):
    """The codec of a QuantSpec (or a runtime scheme name, from a checkpoint's config)."""
    if isinstance(spec_or_scheme, QuantSpec):
        scheme, group_size, double_quant = spec_or_scheme.runtime_scheme, spec_or_scheme.group_size, spec_or_scheme.double_quant
    else:
        scheme = spec_or_scheme
    if scheme in ("nf4", "fp4", "llm-int8"):
        from .bnb_backend import BnbCodec

        return BnbCodec(scheme, double_quant=double_quant)
    from .int_layers import TorchaoCodec

    return TorchaoCodec(scheme, group_size=group_size)


@dataclass(frozen=True)
class Target:
    """One Linear module of the model: its path (= its checkpoint name) and shape."""

    name: str  # model.layers.0.self_attn.q_proj
    out_features: int
    in_features: int


def linear_targets(model: nn.Module) -> list[Target]:
    """Every nn.Linear of the model."""
    return [Target(name, m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def matches(name: str, patterns) -> bool:
    """A pattern matches a module by its full name or any dotted suffix (`lm_head`, `down_proj`, `layers.0.*`)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


@dataclass
class QuantResult:
    quantized: list[str] = field(default_factory=list)  # checkpoint Linear names
    kept: list[str] = field(default_factory=list)  # checkpoint Linear names left in full precision
    notes: list[str] = field(default_factory=list)  # what could not be done as asked, and what was done
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint tensors (when collected)
    label: str = ""  # the scheme as applied (applied_label): int4-g64-g128, int8 ...


def plan(model: nn.Module, spec: QuantSpec) -> tuple[list[Target], list[Target], list[str]]:
    """(targets to quantize, targets kept, notes) without touching any weight."""
    codec = codec_for(spec)
    todo, kept, notes = [], [], []
    grouped: dict[str, list[str]] = {}
    for t in linear_targets(model):
        if matches(t.name, spec.skip):
            kept.append(t)
            continue
        ok, note = codec.plan(t.in_features)
        if note:
            grouped.setdefault(note, []).append(t.name)
        (todo if ok else kept).append(t)
    for note, names in grouped.items():
        notes.append(f"{len(names)} layer(s) ({_short(names)}): {note}")
    return todo, kept, notes


def applied_label(spec: QuantSpec, todo: list[Target]) -> str:
    """The scheme's short name as the planned layers get it: int4 names the group sizes they really use."""
    if spec.runtime_scheme != "int4" or not todo:
        return spec.label
    from .int_layers import int4_group_size

    return scheme_label("int4", group_sizes=[int4_group_size(t.in_features, spec.group_size) for t in todo])


def _short(names: list[str]) -> str:
    leaves = sorted({n.rpartition(".")[2] for n in names})
    return ", ".join(leaves)


def quantize_model(model: nn.Module, spec: QuantSpec, *, collect: bool = False,
                   progress: Callable[[int, int, str], None] | None = None) -> QuantResult:
    """Replace the model's Linear layers in place (float weights are freed as each layer is swapped).

    collect: also return the checkpoint tensors of the quantized layers (for saving).
    progress(done, total, name): after each layer is swapped.
    """
    codec = codec_for(spec)
    todo, kept, notes = plan(model, spec)
    result = QuantResult(notes=notes, kept=[t.name for t in kept], label=applied_label(spec, todo))
    tied_head = has_tied_head(model)
    if spec.quantize_embeddings:
        if codec.backend == "torchao":
            _quantize_embeddings(model, result, collect)
            if tied_head:  # the head is the embedding's int8 table: not quantized a second time
                todo = [t for t in todo if t.name != "lm_head"]
        elif tied_head:
            result.notes.append("bitsandbytes keeps embedding tables in full precision: the tied lm_head gets its own quantized copy")
    done, total = 0, len(todo)
    for t in todo:
        module = model.get_submodule(t.name)
        w = module.weight.detach().contiguous()  # fp32 CPU weights may be K-major (layers.k_major_weights)
        tensors = codec.quantize(w)
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().clone()
        if collect:
            result.tensors.update({f"{t.name}.{k}": v for k, v in tensors.items()})
        result.quantized.append(t.name)
        new = codec.build(tensors, t.name)
        replace_module(model, t.name, new.to(w.device))
        done += 1
        if progress is not None:
            progress(done, total, t.name)
    if "lm_head" in result.quantized and tied_head:
        _untie(model)
    return result


def has_tied_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return bool(getattr(model.config, "tie_word_embeddings", False)) and isinstance(head, nn.Linear)


def _quantize_embeddings(model: nn.Module, result: QuantResult, collect: bool) -> None:
    """int8 rows (one scale per token) for every embedding table, whatever the scheme: a lookup reads
    one row, so 4 bits would save memory, not time. A tied head then multiplies by the int8 table."""
    from .int_layers import Int8Embedding, quantize_int8

    tied = has_tied_head(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Embedding):
            continue
        tensors = quantize_int8(module.weight.detach())
        emb = Int8Embedding(tensors["weight"], tensors["weight_scale"]).to(module.weight.device)
        replace_module(model, name, emb)
        result.quantized.append(name)
        if collect:
            result.tensors.update({f"{name}.{k}": v for k, v in tensors.items()})
        if tied and name.endswith("embed_tokens"):
            model.lm_head = emb.tied_head()
    if tied:
        result.notes.append("lm_head is tied to the embeddings: it multiplies by the same int8 table")


def _untie(model: nn.Module) -> None:
    # A quantized head no longer shares the embedding's weight: the saved config must say so.
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        object.__setattr__(config, "tie_word_embeddings", False)
        config.raw["tie_word_embeddings"] = False


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's remaining parameters under their checkpoint names (a tied head appears once, as the embedding)."""
    return {name: p.detach() for name, p in model.named_parameters()}
