"""The shape of a family's data (core/model/families/__init__.py says how to add one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def _no_hook(*args: Any) -> None:
    return None


# Per-block GGUF leaf -> HF module path, after gguf-py's tensor map (constants.py / tensor_mapping.py),
# for the modules every family here shares.
GGUF_COMMON_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp's converter (convert_hf_to_gguf.py) stores a family."""

    block_names: dict[str, str]  # per-block GGUF leaf -> HF module path
    interleaved_qk: bool = False  # q/k rows interleaved per head for ggml's rotary kernel (undone on read)
    rope_scaling: bool = False  # rope.scaling.* keys and the rope_freqs tensor carry rope_scaling
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
