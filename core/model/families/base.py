"""The shape of a family's data (core/model/families/__init__.py says how to add one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _no_hook(*args: Any) -> None:
    return None


@dataclass(frozen=True)
class GGUFLayout:
    """What llama.cpp's converter (convert_hf_to_gguf.py) does to a family beyond gguf-py's tables: tensor
    names, and which tensors (rope_freqs) an architecture has, come from gguf-py (core/checkpoint/gguf.py)."""

    interleaved_qk: bool = False  # q/k rows interleaved per head for ggml's rotary kernel (undone on read)
    head_dim_from_rope: bool = False  # without attention.key_length, head_dim is rope.dimension_count
    # read_config(get, tensor_names, config): the family's own HF fields from the metadata
    # (get(key, default) reads "<arch>.<key>", floats as their shortest decimal).
    read_config: Callable[[Callable[..., Any], set[str], dict[str, Any]], None] = _no_hook
    # write_config(writer, cfg): the family's own metadata (a gguf.GGUFWriter), or UnsupportedError.
    write_config: Callable[[Any, Any], None] = _no_hook
    # Whitespace-only sentencepiece pieces spelled with real spaces in llama.cpp's vocabulary (Gemma).
    spaces_in_pieces: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str
    defaults: dict[str, Any]
    flags: dict[str, Any]
    # architectures name -> head kind ("causal_lm", "sequence_classification", ...)
    heads: dict[str, str]
    normalize: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda c: c)
    causal_lm: str = ""  # the architectures name of the causal LM class (GGUF files hold only that head)
    gguf: GGUFLayout | None = None  # None: llama.cpp has no such architecture
    # Tokenizer: the transformers class a sentencepiece ("llama") GGUF vocabulary of this family is built
    # as, and the GGUF general.architecture names that pick it (core/tokenizer/gguf_vocab.py).
    tokenizer_class: str = "LlamaTokenizer"
    tokenizer_gguf_architectures: tuple[str, ...] = ()
