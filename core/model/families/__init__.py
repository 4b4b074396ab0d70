"""Everything a model family knows, declared once: config defaults and renames (the reference config
class's), behaviour flags, heads, and what llama.cpp's GGUF does to it beyond gguf-py's tensor names
(metadata, q/k layout).

A family is data, not code paths: layers read the flags on ModelConfig, never the family name; the
loader, the GGUF reader and writer (core/checkpoint/) and the tokenizer read the family's fields.

Adding a family (say `mistral`):
1. core/model/families/mistral.py with `FAMILY = Family(model_type="mistral", ...)`: the defaults of transformers'
   MistralConfig, the flags its layers need (add a flag to core/model/config.py + core/model/layers.py only for
   behaviour no family has yet), `heads` (architectures name -> head kind), `normalize` for renamed or
   derived fields, and `gguf` (read/write hooks for its metadata, layout changes llama.cpp's converter
   makes) if llama.cpp has the architecture; tensor names come from gguf-py's TensorNameMap.
2. Register it in `_registry` below.
3. Tests: a tiny random config against transformers in tests/test_parity.py (logits, greedy tokens,
   incremental == full) and a GGUF round trip in tests/test_convert.py.
"""

from __future__ import annotations

from llm_torch.core.errors import UnsupportedError
from .base import Family, GGUFLayout

__all__ = ["Family", "GGUFLayout", "family_for", "supported_model_types", "gguf_families", "tokenizer_class_for"]


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


def tokenizer_class_for(name: str) -> str | None:
    """The transformers tokenizer class for a model_type / GGUF architecture a family lists (its
    tokenizer_gguf_architectures: "gemma" and "gemma3" too, whose vocabularies Gemma 2's class reads);
    None when no family lists it."""
    for family in _registry().values():
        if name in family.tokenizer_gguf_architectures:
            return family.tokenizer_class
    return None


def gguf_families() -> dict[str, Family]:
    """GGUF general.architecture -> family (llama.cpp names these as transformers' model_type)."""
    return {name: f for name, f in _registry().items() if f.gguf is not None}
