"""GGUF files in Hugging Face terms: config, tensor names and layouts, tokenizer; the GGUFCheckpoint.

    checkpoint = GGUFCheckpoint(path)      # metadata only (memory-mapped)
    checkpoint.config, checkpoint.tokenizer()
    for hf_name, tensor in checkpoint.read(torch.float16): ...

Tensors come out one at a time in HF layout: llama.cpp's converter (convert_hf_to_gguf.py) renamed
them (gguf-py's TensorNameMap, which gguf_tensor_names applies to our own parameter names), interleaved
Llama's q/k rows for its rotary kernel and stored (1 + w) norm scales for families whose RMSNorm adds
one; all three are undone here, as gguf-py and each family's GGUFLayout (core/model/families/) say.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import (MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, GGUFReader,
                  TensorNameMap)

from llm_torch.core.model.bounds import bounded_int
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import CheckpointError, ConfigError, UnsupportedError
from llm_torch.core.model.families import Family, gguf_families
from .base import Checkpoint, TensorInfo, generation_config_for, interleaved_to_halves, selected, write_json
from .gguf_reader import dequantize, gguf_metadata, kernel_kinds, open_gguf, raw_rows, release_fields, release_pages
from .gguf_rope import f32_decimal, rope_scaling_from_gguf

if TYPE_CHECKING:  # torch is imported where tensors are made: config and tokenizer stay torch-free
    import torch

_LAYER_RE = re.compile(r"blk\.(\d+)\.")
# llama.cpp writes this for Llama 3.x rope scaling; it is config, not a parameter (see gguf_rope_freqs).
ROPE_FREQS = f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"
# GGUF general.architecture (llama.cpp names these as transformers' model_type) -> gguf-py's MODEL_ARCH.
_ARCHES = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}


def gguf_family(arch: str | None) -> Family:
    """The family of a GGUF general.architecture, or UnsupportedError."""
    families = {name: f for name, f in gguf_families().items() if name in _ARCHES}
    if arch not in families:
        raise UnsupportedError(f"GGUF architecture '{arch}' is not supported", hint=f"supported: {', '.join(families)}")
    return families[arch]


def has_rope_freqs(family: Family) -> bool:
    """Whether llama.cpp's architecture carries Llama 3.x rope scaling as the rope_freqs tensor."""
    return MODEL_TENSOR.ROPE_FREQS in MODEL_TENSORS[_ARCHES[family.model_type]]


# --------------------------------------------------------------------------------------------- config


def gguf_config_dict(
    meta: Mapping[str, Any], tensor_names: Collection[str], rope_freqs: Sequence[float] | None = None
) -> dict[str, Any]:
    """An HF config.json-style dict (HF field names) for a GGUF file's metadata.

    `tensor_names`: the file's tensor names (ties and biases are read off them). `rope_freqs`: the
    values of its `rope_freqs.weight` tensor if it has one (Llama 3.x; see gguf_rope_freqs), from which
    the "llama3" rope scaling is recovered. Float32 metadata is given back as its shortest decimal
    (1e-05, not 9.999999747378752e-06), which is what the original config.json said.
    """
    arch = meta.get("general.architecture")
    if arch is None:
        raise ConfigError("GGUF metadata has no 'general.architecture'")
    family = gguf_family(arch)
    layout = family.gguf
    names = set(tensor_names)

    def get(key: str, default: Any = None) -> Any:
        return f32_decimal(meta.get(f"{arch}.{key}", default))

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ConfigError(
                f"GGUF metadata lacks '{full}'", hint="the file was not written by a known llama.cpp converter"
            )
        return meta[full]

    def size(field: str, key: str, value: Any) -> int:
        # Checked as read: the family hook loops over layers, gguf-py's name table is built per layer.
        return bounded_int(field, _per_layer_uniform(value, f"{arch}.{key}"), "GGUF metadata", f"{arch}.{key}")

    hidden = size("hidden_size", "embedding_length", need("embedding_length"))
    heads = size("num_attention_heads", "attention.head_count", need("attention.head_count"))
    kv_heads = size("num_key_value_heads", "attention.head_count_kv", get("attention.head_count_kv", heads))
    layers = size("num_hidden_layers", "block_count", need("block_count"))
    _check_layers_present(layers, names, f"{arch}.block_count")
    # key_length when written (llama.cpp's rule), else Llama's rope.dimension_count, which llama.cpp
    # requires to equal the head size (transformers reads head_dim from it), else n_embd / n_head.
    rot = get("rope.dimension_count")
    head_dim = get("attention.key_length")
    if head_dim is None and layout.head_dim_from_rope:
        head_dim = rot
    head_dim = size("head_dim", "attention.key_length", head_dim or hidden // heads)
    value_dim = size("head_dim", "attention.value_length", get("attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise UnsupportedError(f"GGUF attention.value_length {value_dim} differs from key_length {head_dim}")

    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
        vocab = len(tokens)
    vocab = size("vocab_size", "vocab_size", vocab)

    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [family.causal_lm],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": size("intermediate_size", "feed_forward_length", need("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": size("max_position_embeddings", "context_length", need("context_length")),
        "rms_norm_eps": f32_decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": f32_decimal(get("rope.freq_base", 10000.0)),
        # llama.cpp's converter writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if rot is not None and int(rot) != head_dim:
        config["partial_rotary_factor"] = int(rot) / head_dim  # ModelConfig rejects it with a clear message
    rope_scaling = rope_scaling_from_gguf(get, config, rope_freqs, ROPE_FREQS in names)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling

    layout.read_config(get, names, config)
    return config


def gguf_rope_freqs(reader: GGUFReader) -> list[float] | None:
    """The values of the file's `rope_freqs.weight` (per-frequency divisors; Llama 3.x), or None."""
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            return dequantize(t).float().reshape(-1).tolist()
    return None


def _check_layers_present(layers: int, names: set[str], key: str) -> None:
    """A declared layer count past the blk.N tensors the file holds (a file with none is metadata only;
    a tensor past the count is hf_tensor_name's error, met when it is read)."""
    present = {int(m.group(1)) for m in map(_LAYER_RE.match, names) if m}
    if present and layers > max(present) + 1:
        raise CheckpointError(f"GGUF metadata {key} = {layers}, but the file holds tensors for {max(present) + 1} layers",
                              hint="the file is corrupt or its metadata was edited; download it again")


def _per_layer_uniform(value: Any, key: str) -> Any:
    # Some converters write one value per layer; our layers take one value for all.
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise UnsupportedError(f"GGUF '{key}' varies per layer ({value}), which is not supported")
        return value[0]
    return value


def _eos_ids(meta: Mapping[str, Any]) -> int | list[int] | None:
    # llama.cpp ends generation on eos, eot and eom alike (llama_vocab::is_eog); chat models need all.
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


# --------------------------------------------------------------------------------------------- tensors


def gguf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """HF state-dict name -> GGUF tensor name, for each parameter of `config`'s causal LM that llama.cpp's
    architecture has (Gemma 2 has no `output`: llama.cpp always ties it to token_embd).

    gguf-py's TensorNameMap (the table convert_hf_to_gguf.py renames with) knows many spellings of each
    tensor; applied to our own parameter names (the model built on the meta device) it is one-to-one.
    """
    import torch

    from llm_torch.core.model.model import CausalLM

    family = gguf_family(config.model_type)
    with torch.device("meta"):
        params = [name for name, _ in CausalLM(config).named_parameters(remove_duplicate=False)]
    table = TensorNameMap(_ARCHES[family.model_type], config.num_hidden_layers)
    names = {}
    for hf_name in params:
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            names[hf_name] = gguf_name
    assert len(set(names.values())) == len(names), "gguf-py maps two of our parameters to one GGUF tensor"
    return names


def hf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> HF state-dict name (gguf_tensor_names inverted)."""
    return {gguf_name: hf_name for hf_name, gguf_name in gguf_tensor_names(config).items()}


def qk_heads(config: ModelConfig, hf_name: str) -> int | None:
    """The head count whose q/k rows llama.cpp's converter interleaves in tensor `hf_name` (Llama's
    LlamaModel.permute, for ggml's rotary kernel), or None for a tensor stored as it is."""
    if not gguf_family(config.model_type).gguf.interleaved_qk:
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def _packable(t: Any, hf_name: str, kinds: Collection[int]) -> int | None:
    """The kind `t` is kept packed as (one of `kinds`), or None: a matrix of whole blocks per row only."""
    kind = kernel_kinds().get(t.tensor_type)
    if kind is None or kind not in kinds or len(t.shape) != 2 or not hf_name.endswith(".weight"):
        return None
    return kind


def iter_gguf_tensors(
    reader: GGUFReader, config: Mapping[str, Any], dtype: torch.dtype, names: Mapping[str, str] | None = None,
    packed: Collection[int] = (),
) -> Iterator[tuple[str, Any]]:
    """Yield (HF state-dict name, tensor in HF layout and `dtype`), one tensor at a time, in file order.

    `config` is gguf_config_dict's result; `names` its hf_tensor_names if already known. Tensors the model
    has no parameter for (rope_freqs) are skipped; a tensor name this loader does not know raises CheckpointError.
    packed: kernel kinds (gguf_reader.kernel_kinds' values) whose matrices come as gguf_quant.PackedRows, the file's blocks
    with q/k rows un-interleaved; with any, F32/F16/BF16 tensors keep their own dtype and `dtype` is the one
    of the other quantized tensors (decoded).
    """
    import torch

    from llm_torch.core.model.gguf_quant import PackedRows

    cfg = ModelConfig.from_dict(dict(config))
    names = hf_tensor_names(cfg) if names is None else names
    own = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
           GGMLQuantizationType.BF16: torch.bfloat16} if packed else {}
    for t in reader.tensors:
        hf_name = hf_tensor_name(names, t.name, cfg)
        if hf_name is None:
            continue
        kind = _packable(t, hf_name, packed) if packed else None
        if kind is not None:
            rows = raw_rows(t)
            heads = qk_heads(cfg, hf_name)
            if heads is not None:  # whole rows move: the blocks of a row stay as they are
                rows = _unpermute_qk(rows, heads, t.name)
            release_pages(reader, t)
            yield hf_name, PackedRows(kind, rows, int(t.shape[0]))
            continue
        offset_norm = cfg.norm_unit_offset and hf_name.endswith("norm.weight")
        target = own.get(t.tensor_type, dtype)
        w = dequantize(t, torch.float32 if offset_norm else target)
        heads = qk_heads(cfg, hf_name)
        if heads is not None:
            w = _unpermute_qk(w, heads, t.name)
        if offset_norm:
            # convert_hf_to_gguf.py stored the RMSNorm scale as (1 + w) for ggml; HF keeps w.
            # Subtract in fp32 before the cast, as transformers does.
            w = w - 1.0
        release_pages(reader, t)
        yield hf_name, w.to(target)


def hf_tensor_name(names: Mapping[str, str], name: str, config: ModelConfig) -> str | None:
    """GGUF tensor name -> HF state-dict name by `names` (hf_tensor_names); None for a tensor with no
    parameter (rope_freqs). Raises CheckpointError for a name unknown to the family or a layer past the last."""
    if name in names:
        return names[name]
    family = gguf_family(config.model_type)
    if name == ROPE_FREQS and has_rope_freqs(family):
        return None
    m = _LAYER_RE.match(name)
    if m and int(m.group(1)) >= config.num_hidden_layers:
        raise CheckpointError(f"GGUF tensor '{name}' is for layer {m.group(1)}, but the model has "
                              f"{config.num_hidden_layers} layers")
    raise CheckpointError(
        f"GGUF tensor '{name}' is unknown for architecture '{family.model_type}'",
        hint="the file may be for a different model type",
    )


def _unpermute_qk(w: torch.Tensor, n_head: int, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute (rows per head: HF halves -> interleaved pairs)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"GGUF tensor '{name}' has {rows} rows, not a multiple of 2 x {n_head} heads")
    # GGUF row (head, i, half) holds HF row (head, half, i); swap back. Works for weights and biases.
    return interleaved_to_halves(w, n_head).contiguous()


# --------------------------------------------------------------------------------------------- checkpoint


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"

    def __init__(self, path: Path):
        self.warnings = []
        self.path = path
        self._reader = open_gguf(path, plain_arrays=True)
        self.meta = gguf_metadata(self._reader)
        release_fields(self._reader)  # meta has every value now; the fields' per-string views cost ~36 MB
        names = [t.name for t in self._reader.tensors]
        raw = gguf_config_dict(self.meta, names, gguf_rope_freqs(self._reader))
        self.config = ModelConfig.from_dict(raw)
        self.config_dict = {k: v for k, v in raw.items() if k not in ("rope_parameters",)}
        self._gguf_config = raw

    @cached_property
    def _hf_names(self) -> dict[str, str]:
        return hf_tensor_names(self.config)

    @cached_property
    def tensors(self) -> list[TensorInfo]:
        import torch

        out = []
        for t in self._reader.tensors:
            hf_name = hf_tensor_name(self._hf_names, t.name, self.config)
            if hf_name is not None:
                out.append(TensorInfo(hf_name, tuple(int(n) for n in reversed(t.shape.tolist())), torch.float32))
        return out

    @cached_property
    def default_dtype(self) -> torch.dtype:
        """Unquantized files keep their dtype; dequantized ones become float16, which holds Q8/Q4 block
        values (fp16 scale x small int) more exactly than bfloat16 (the loader's --dtype auto on CPU)."""
        import torch
        from gguf import GGMLQuantizationType as Q

        own = {Q.F32: torch.float32, Q.BF16: torch.bfloat16}
        kinds = {own.get(t.tensor_type, torch.float16) for t in self._reader.tensors
                 if len(t.shape) > 1}  # matrices: norms and biases are stored in F32 whatever the file type
        return kinds.pop() if len(kinds) == 1 else torch.float16

    def read(self, dtype, select=None):
        if dtype is None:
            dtype = self.default_dtype
        # Quantized blocks cannot be cut before they are decoded: read whole, then select.
        return selected(iter_gguf_tensors(self._reader, self._gguf_config, dtype, self._hf_names), select)

    def read_packed(self, dtype, kinds: Collection[int]):
        """read(dtype), with the matrices of these kernel kinds as gguf_quant.PackedRows (iter_gguf_tensors)."""
        return iter_gguf_tensors(self._reader, self._gguf_config, dtype, self._hf_names, packed=kinds)

    def packed_tensors(self, kinds: Collection[int]) -> dict[str, tuple[int, tuple[int, int], int]]:
        """HF name -> (kind, shape, bytes) of the matrices read_packed(kinds) keeps packed (header only)."""
        out = {}
        for t in self._reader.tensors:
            hf_name = hf_tensor_name(self._hf_names, t.name, self.config)
            kind = None if hf_name is None else _packable(t, hf_name, kinds)
            if kind is not None:
                out[hf_name] = (kind, (int(t.shape[1]), int(t.shape[0])), int(t.n_bytes))
        return out

    def tokenizer(self):
        from llm_torch.core.tokenizer import Tokenizer

        if not self.meta:
            raise CheckpointError(f"the tokenizer metadata of {self.path} was already released")
        return Tokenizer.from_gguf_metadata(self.meta)

    def release_metadata(self) -> None:
        # The vocabulary as Python lists (~tens of MB): freed before the weights arrive, not added to the peak.
        self.meta = {}

    def write_tokenizer_files(self, folder):
        tok = self.tokenizer()
        (folder / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
                                  "add_eos_token": bool(self.meta.get("tokenizer.ggml.add_eos_token", False)),
                                  "clean_up_tokenization_spaces": False,
                                  "model_max_length": self.config.max_position_embeddings}
        for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            i = self.meta.get(f"tokenizer.ggml.{gguf_key}")
            if i is not None and tok.id_to_token(int(i)) is not None:
                config[key] = tok.id_to_token(int(i))
        if tok.chat_template:
            config["chat_template"] = tok.chat_template
        write_json(folder / "tokenizer_config.json", config)
        write_json(folder / "generation_config.json", generation_config_for(self.config, tok))
