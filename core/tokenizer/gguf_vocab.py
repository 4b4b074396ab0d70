"""A GGUF file's tokenizer, from its metadata, into the arguments Tokenizer.from_gguf_metadata builds the
Tokenizer from. A GGUF carries only the vocabulary, so the `tokenizers` pipeline is rebuilt the way
transformers rebuilds it (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import Tokenizer as Backend

from llm_torch.core.errors import TokenizerError
from llm_torch.core.model.bounds import LIMITS
from llm_torch.core.model.families import tokenizer_class_for
from .backends import byte_alphabet, byte_level_backend, sentencepiece_backend
from .special_tokens import CLASS_SPECIALS, add_tokens

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


def sentencepiece_class(architecture: str) -> str:
    """The transformers class a sentencepiece GGUF vocabulary of `architecture` is built as (families' data);
    transformers' GGUF loader builds every other sentencepiece architecture as LlamaTokenizer."""
    return tokenizer_class_for(architecture) or "LlamaTokenizer"


def read_gguf_vocab(meta: Mapping[str, Any], *, legacy: bool | None = None,
                    add_prefix_space: bool | None = None) -> tuple[Backend, dict[str, Any]]:
    """The backend and the Tokenizer's keyword arguments `meta` (GGUF keys -> plain Python values) describes.
    A LlamaTokenizer vocabulary takes transformers' defaults legacy=False, add_prefix_space=True unless
    overridden here (transformers ignores tokenizer.ggml.add_space_prefix, and so do we)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}",
                             hint="supported: 'gpt2' (byte-level BPE) and 'llama' (sentencepiece BPE)")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens", hint="the file is not a complete model")
    _, most = LIMITS["vocab_size"]
    if len(tokens) > most:
        # Before the backend's vocabulary and merge tables, which grow with it.
        raise TokenizerError(f"GGUF tokenizer.ggml.tokens holds {len(tokens)} tokens, past the sane {most}",
                             hint="the file's tokenizer metadata is corrupt")
    types = list(meta.get("tokenizer.ggml.token_type") or [0] * len(tokens))
    scores = meta.get("tokenizer.ggml.scores")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise TokenizerError("GGUF token_type/scores lengths differ from tokenizer.ggml.tokens",
                             hint="the file's tokenizer metadata is corrupt")
    merges = meta.get("tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else None

    def ggml_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= value < len(tokens):
            raise TokenizerError(f"GGUF tokenizer.ggml.{key} {value} is outside the vocabulary",
                                 hint="the file's tokenizer metadata is corrupt")
        return value

    if kind == "gpt2":
        # A control token the file spells outside the byte alphabet is a llama.cpp mislabel; transformers
        # skips it (checked before respelling, which would hide it).
        alphabet = set(byte_alphabet().values())
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        backend, tokens = byte_level_backend(tokens, merges, meta.get("tokenizer.ggml.pre"))
        tokenizer_class = "GPT2Tokenizer"
    else:
        tokenizer_class = sentencepiece_class(meta.get("general.architecture", ""))
        backend, tokens = sentencepiece_backend(tokens, merges, scores, tokenizer_class)
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    spaces = None
    if tokenizer_class == "LlamaTokenizer":
        spaces = (bool(legacy), True if add_prefix_space is None else add_prefix_space)
    elif legacy is not None or add_prefix_space is not None:
        raise TokenizerError(f"legacy / add_prefix_space apply to a LlamaTokenizer (sentencepiece) vocabulary; "
                             f"this GGUF vocabulary is built as {tokenizer_class}",
                             hint="leave the options out for this model")
    ids = {key: ggml_id(key) for key in ("bos_token_id", "eos_token_id", "padding_token_id",
                                         "unknown_token_id", "eot_token_id", "eom_token_id")}
    named = [tokens[i] for key, i in ids.items() if i is not None and key not in ("eot_token_id", "eom_token_id")]
    vocab = set(tokens)
    add_tokens(backend, [t for t in CLASS_SPECIALS[tokenizer_class] if t in vocab] + control + named, special=True)
    # USER_DEFINED tokens (e.g. <think>) are matched whole in text, but are not special.
    add_tokens(backend, [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED], special=False)
    templates = {key.removeprefix("tokenizer.chat_template."): value for key, value in meta.items()
                 if key.startswith("tokenizer.chat_template.") and isinstance(value, str)}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        templates["default"] = meta["tokenizer.chat_template"]
    # llama.cpp adds BOS to a sentencepiece vocab that does not say otherwise; transformers follows it.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    # EOT/EOM (Gemma's <end_of_turn>, Llama 3's <|eot_id|>) also end a reply in llama.cpp.
    eos = [i for i in (ids["eos_token_id"], ids["eot_token_id"], ids["eom_token_id"]) if i is not None]
    return backend, dict(
        name=str(meta.get("general.name") or "GGUF model"),
        bos_token_id=ids["bos_token_id"],
        eos_token_ids=eos,
        pad_token_id=ids["padding_token_id"],
        unk_token_id=ids["unknown_token_id"],
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_templates=templates,
        llama_spaces=spaces,
        # transformers builds a LlamaTokenizerFast / GemmaTokenizerFast (left padding) for these families' GGUFs
        padding_side="left" if tokenizer_class_for(meta.get("general.architecture", "")) else "right",
    )

