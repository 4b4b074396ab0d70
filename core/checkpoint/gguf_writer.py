"""Write a checkpoint as a llama.cpp GGUF file (gguf-py's GGUFWriter), one tensor at a time.

The inverse of core/checkpoint/gguf.py: HF names -> GGUF names (gguf-py's TensorNameMap, through
gguf.gguf_tensor_names), q/k rows back to the interleaved rotary layout llama.cpp's kernel expects (Llama),
(1 + w) norm scales (Gemma 2), and the metadata keys convert_hf_to_gguf.py writes (hyper-parameters,
tokenizer, chat template); each family's GGUFLayout (core/model/families/) says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import UnsupportedError
from llm_torch.core.model.families import Family, family_for
from .gguf import ROPE_FREQS, gguf_tensor_names, has_rope_freqs, qk_heads
from .gguf_rope import llama3_rope_factors
from .base import halves_to_interleaved

_OUTTYPES = {"f32": (Q.F32, LlamaFileType.ALL_F32), "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
             "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
_SPACE = "\u2581"


def write_gguf(checkpoint, path: Path, outtype: str, progress=None) -> tuple[int, int]:
    """Write `checkpoint` (core.tools.convert.Checkpoint) to `path`; returns (tensor count, tensor bytes)."""
    cfg = checkpoint.config
    family = _family(cfg)
    qtype, file_type = _OUTTYPES[outtype]
    names = gguf_tensor_names(cfg)
    plan = []  # (hf name, gguf name, torch shape, ggml type)
    for t in checkpoint.tensors:
        if t.name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        if t.name not in names:
            raise UnsupportedError(f"tensor '{t.name}' has no GGUF name for architecture '{family.model_type}'",
                                   hint="only the causal LM weights llama.cpp's architecture has can be written as GGUF")
        plan.append((t.name, names[t.name], t.shape, _tensor_type(qtype, t.shape)))
    rope_freqs = _rope_freqs(cfg) if has_rope_freqs(family) else None

    w = GGUFWriter(str(path), family.model_type)
    try:
        _add_hparams(w, cfg, family, checkpoint)
        w.add_file_type(int(file_type))
        if qtype == Q.Q8_0:
            w.add_quantization_version(2)
        _add_vocab(w, gguf_vocab(checkpoint))
        if rope_freqs is not None:
            w.add_tensor_info(ROPE_FREQS, rope_freqs.shape, np.float32, rope_freqs.nbytes)
        total = 0
        for _, name, shape, kind in plan:
            nbytes = _nbytes(kind, shape)
            byte_shape = (*shape[:-1], nbytes // max(1, _rows(shape)))
            if kind in (Q.F32, Q.F16):
                w.add_tensor_info(name, shape, np.float32 if kind == Q.F32 else np.float16, nbytes)
            else:
                w.add_tensor_info(name, byte_shape, np.uint8, nbytes, raw_dtype=kind)
            total += nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if rope_freqs is not None:
            w.write_tensor_data(rope_freqs)
        done = 0
        by_name = {hf: (name, shape, kind) for hf, name, shape, kind in plan}
        # 16-bit outputs read 16-bit sources as they are (no float32 copy of each tensor); GGUF sources
        # are dequantized to float32 so nothing is rounded twice.
        exact = checkpoint.kind == "gguf" or qtype in (Q.F32, Q.Q8_0)
        for hf_name, tensor in checkpoint.read(torch.float32 if exact else None):
            if hf_name not in by_name:
                continue
            name, shape, kind = by_name[hf_name]
            w.write_tensor_data(_encode(_to_gguf_layout(tensor, hf_name, cfg), kind))
            done += _nbytes(kind, shape)
            del tensor
            if progress is not None:
                progress(done, total, hf_name)
    finally:
        w.close()
    return len(plan), total


def _family(cfg: ModelConfig) -> Family:
    family = family_for(cfg.model_type)
    if family.gguf is None or any(a != family.causal_lm for a in cfg.architectures):
        raise UnsupportedError(f"only causal language models of a family llama.cpp knows can be written as GGUF, "
                               f"not {', '.join(cfg.architectures) or cfg.model_type}")
    return family


def _tensor_type(qtype: Q, shape: tuple[int, ...]) -> Q:
    # As convert_hf_to_gguf.py: 1-D tensors (norms, biases) stay F32; Q8_0 needs rows of whole 32-blocks.
    if len(shape) < 2:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % 32:
        return Q.F16
    return qtype


def _rows(shape) -> int:
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _nbytes(kind: Q, shape) -> int:
    n = _rows(shape) * shape[-1]
    return {Q.F32: 4 * n, Q.F16: 2 * n, Q.BF16: 2 * n, Q.Q8_0: n // 32 * 34}[kind]


def _to_gguf_layout(w: torch.Tensor, hf_name: str, cfg: ModelConfig) -> torch.Tensor:
    heads = qk_heads(cfg, hf_name)
    if heads is not None:
        return halves_to_interleaved(w, heads)
    if cfg.norm_unit_offset and hf_name.endswith("norm.weight"):
        return w.float() + 1.0  # ggml's RMSNorm multiplies by the stored scale; this family's is (1 + w)
    return w


def _encode(w: torch.Tensor, kind: Q) -> np.ndarray:
    if kind == Q.F32:
        return w.float().contiguous().numpy()
    if kind == Q.F16:
        return w.half().contiguous().numpy()
    if kind == Q.BF16:
        return w.bfloat16().contiguous().view(torch.uint8).numpy()
    return quantize(w.float().contiguous().numpy(), kind)


def _rope_freqs(cfg: ModelConfig) -> np.ndarray | None:
    rope = cfg.rope_parameters
    if rope.get("rope_type") != "llama3":
        return None
    factors = llama3_rope_factors(rope["rope_theta"], cfg.head_dim, rope["factor"], rope["low_freq_factor"],
                                            rope["high_freq_factor"], rope["original_max_position_embeddings"])
    return np.asarray(factors, dtype=np.float32)


# general.* keys of a GGUF source that describe the model, not the file: carried over as they are.
_GENERAL_KEPT = ("name", "basename", "finetune", "size_label", "license", "organization", "languages", "type",
                 "author", "version", "description", "url", "repo_url", "tags")


def _add_hparams(w: GGUFWriter, cfg: ModelConfig, family: Family, checkpoint) -> None:
    meta = getattr(checkpoint, "meta", None) or {}
    general = {f"general.{k}": meta[f"general.{k}"] for k in _GENERAL_KEPT if f"general.{k}" in meta}
    general.setdefault("general.name", Path(str(checkpoint.path)).name.removesuffix(".gguf"))
    _add_vocab(w, general)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    family.gguf.write_config(w, cfg)


# --------------------------------------------------------------------------------------------- vocabulary

_ID_KEYS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
            "eom_token_id", "seperator_token_id", "mask_token_id")


def _add_vocab(w: GGUFWriter, vocab: dict[str, Any]) -> None:
    """Tokenizer (or general.*) metadata with the value types llama.cpp reads (uint32 ids, int32 types,
    float32 scores; strings, bools and string lists as they are)."""
    for key, value in vocab.items():
        leaf = key.removeprefix("tokenizer.ggml.")
        if key == "tokenizer.ggml.tokens":
            w.add_token_list(value)
        elif key == "tokenizer.ggml.scores":
            w.add_token_scores([float(v) for v in value])
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types([int(v) for v in value])
        elif key == "tokenizer.ggml.merges":
            w.add_token_merges(value)
        elif key == "tokenizer.ggml.precompiled_charsmap":
            w.add_precompiled_charsmap(bytes(value))
        elif leaf in _ID_KEYS:
            w.add_uint32(key, int(value))
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)


def _padded(tokens: list[str], types: list[int], scores: list[float] | None, size: int):
    # convert_hf_to_gguf.py pads a vocabulary smaller than the embedding with unused [PADn] tokens.
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)


def gguf_vocab(checkpoint) -> dict[str, Any]:
    """The tokenizer.* GGUF metadata (key -> plain value) llama.cpp needs, for any checkpoint."""
    meta = getattr(checkpoint, "meta", None)
    if checkpoint.kind == "gguf" and meta:
        return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}  # carried over as it is
    tok = checkpoint.tokenizer()
    spm = checkpoint.sentencepiece_model()
    if spm is not None:
        # llama.cpp's own converter prefers the sentencepiece model (it has the scores).
        return vocab_from_sentencepiece(spm, checkpoint.config, tok.chat_template, add_bos=tok.add_bos_token)
    return vocab_from_tokenizer(tok, checkpoint.config)


def vocab_from_sentencepiece(m, cfg: ModelConfig, chat_template: str | None, *, add_bos: bool) -> dict[str, Any]:
    """GGUF tokenizer metadata from a sentencepiece model, as convert_hf_to_gguf.py's _set_vocab_sentencepiece."""
    tokens, scores, types = list(m.pieces), list(m.scores), list(m.types)
    layout = family_for(cfg.model_type).gguf
    if layout is not None and layout.spaces_in_pieces:
        # llama.cpp's Gemma vocabularies spell whitespace-only pieces with real spaces.
        tokens = [" " * len(t) if len(t) > 1 and set(t) == {_SPACE} else t for t in tokens]
    _padded(tokens, types, scores, cfg.vocab_size)
    vocab: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                             "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                             "tokenizer.ggml.token_type": types}
    for key, i in (("bos_token_id", m.bos_id), ("eos_token_id", m.eos_id), ("unknown_token_id", m.unk_id),
                   ("padding_token_id", m.pad_id)):
        if 0 <= i < len(m.pieces):
            vocab[f"tokenizer.ggml.{key}"] = i
    vocab["tokenizer.ggml.add_bos_token"] = bool(add_bos)
    vocab["tokenizer.ggml.add_eos_token"] = False
    vocab["tokenizer.ggml.add_space_prefix"] = bool(m.add_dummy_prefix)
    if chat_template:
        vocab["tokenizer.chat_template"] = chat_template
    return vocab


# convert_hf_to_gguf.py names byte-level pre-tokenizers by what they split on; these are the ones we tell apart.
_LLAMA3_REGEX_PART = "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def vocab_from_tokenizer(tok, cfg: ModelConfig) -> dict[str, Any]:
    """GGUF tokenizer metadata from a tokenizer.json pipeline (BPE: byte-level -> gpt2, byte-fallback -> llama)."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"a {model.get('type')} tokenizer.json cannot be written as GGUF",
                               hint="byte-level BPE and sentencepiece BPE tokenizers are supported")
    added = spec.get("added_tokens") or []
    size = max([cfg.vocab_size, *(i + 1 for i in model["vocab"].values()), *(a["id"] + 1 for a in added)])
    tokens: list[str | None] = [None] * size
    types = [int(TokenType.UNUSED)] * size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    byte_level = '"ByteLevel"' in text
    if not byte_level:
        for i, t in enumerate(tokens):
            if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = int(TokenType.BYTE)
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    vocab: dict[str, Any] = {"tokenizer.ggml.model": "gpt2" if byte_level else "llama"}
    if byte_level:
        pre = list(_strings(spec.get("pre_tokenizer")))
        vocab["tokenizer.ggml.pre"] = ("llama-bpe" if any(_LLAMA3_REGEX_PART in s for s in pre)
                                       else "smollm" if "Digits" in pre else "gpt-2")
    else:
        vocab["tokenizer.ggml.pre"] = "default"
        # llama.cpp's sentencepiece tokenizer merges by score: rank the merged pieces as the merges do.
        rank = {m.replace(" ", "", 1): r for r, m in reversed(list(enumerate(merges)))}
        vocab["tokenizer.ggml.scores"] = [-float(rank.get(t, len(merges))) for t in tokens]
        normalizer = json.dumps(spec.get("normalizer"))
        vocab["tokenizer.ggml.add_space_prefix"] = '"Prepend"' in normalizer or '"prepend_scheme": "first"' in text \
            or '"prepend_scheme": "always"' in text
    vocab["tokenizer.ggml.tokens"] = tokens
    vocab["tokenizer.ggml.token_type"] = types
    vocab["tokenizer.ggml.merges"] = merges
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "padding_token_id": tok.pad_token_id,
           "unknown_token_id": tok.token_to_id(model["unk_token"]) if model.get("unk_token") else None}
    extra_eos = [i for i in tok.eos_token_ids if i != tok.eos_token_id]
    if extra_eos:
        ids["eot_token_id"] = extra_eos[0]  # e.g. Gemma's <end_of_turn>: llama.cpp stops on it too
    for key, i in ids.items():
        if i is not None:
            vocab[f"tokenizer.ggml.{key}"] = int(i)
    vocab["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos_token)
    probe = tok.encode("a")
    vocab["tokenizer.ggml.add_eos_token"] = bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id
                                                 and tok.eos_token_id not in tok.encode("a", add_special_tokens=False))
    if tok.chat_template:
        vocab["tokenizer.chat_template"] = tok.chat_template
    return vocab
