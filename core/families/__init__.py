"""Per-family data: defaults (the reference config class's), behaviour flags, supported heads.

A family is data, not code paths: layers read the flags on ModelConfig, never the family name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Family:
    model_type: str
    defaults: dict[str, Any]
    flags: dict[str, Any]
    # architectures name -> head kind ("causal_lm", "sequence_classification", ...)
    heads: dict[str, str]
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda c: c)
    # Tokenizer: the transformers class a sentencepiece ("llama") GGUF vocabulary of this family is built
    # as, and the GGUF general.architecture names that pick it (core/tokenizer/gguf_vocab.py).
    tokenizer_class: str = "LlamaTokenizer"
    tokenizer_gguf_architectures: tuple[str, ...] = ()


def _registry() -> dict[str, Family]:
    from . import gemma2, llama

    return {f.model_type: f for f in (llama.FAMILY, gemma2.FAMILY)}


def family_for(model_type: str) -> Family:
    families = _registry()
    if model_type not in families:
        raise UnsupportedError(
            f"model_type '{model_type}' is not supported", hint=f"supported model types: {', '.join(sorted(families))}"
        )
    return families[model_type]


def supported_model_types() -> list[str]:
    return sorted(_registry())
