"""Read llama.cpp GGUF files and hand back what the loader needs in Hugging Face terms.

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = [t.name for t in reader.tensors]
    config = gguf_config_dict(meta, names, rope_freqs=gguf_rope_freqs(reader))
    for hf_name, tensor in iter_gguf_tensors(reader, config, torch.bfloat16): ...

Tensors come out one at a time in HF layout: llama.cpp's converter (convert_hf_to_gguf.py) renamed
them, interleaved Llama's q/k rows for its rotary kernel and stored Gemma's norm scales as 1 + w;
all three are undone here.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

from .errors import CheckpointError, ConfigError, UnsupportedError

SUPPORTED_ARCHITECTURES = ("llama", "gemma2")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}

# Per-block GGUF leaf name -> HF module path, after gguf-py's tensor map (constants.py / tensor_mapping.py).
_COMMON_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAMES = {
    "llama": {**_COMMON_BLOCK, "ffn_norm": "post_attention_layernorm"},
    # Gemma 2's sandwich norms: llama.cpp calls the pre-MLP norm ffn_norm, so it is *not* Llama's.
    "gemma2": {
        **_COMMON_BLOCK,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")
# llama.cpp writes this for Llama 3.x rope scaling; it is config, not a parameter (see gguf_rope_freqs).
_ROPE_FREQS = "rope_freqs.weight"
_U64 = struct.Struct("=Q")  # GGUF string lengths, in the file's (here: host) byte order

# llama.cpp's defaults when a Gemma 2 file omits these keys (llama-hparams.h / HF Gemma2Config agree).
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096}
# rope.scaling.* keys convert_hf_to_gguf.py writes for YaRN -> HF rope_scaling keys.
_YARN_KEYS = {"yarn_attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


# --------------------------------------------------------------------------------------------- reading


class _FastGGUFReader(GGUFReader):
    """GGUFReader with the same fields, parts and tensors, parsed ~15x faster.

    The stock reader builds every array element (49k tokens, 49k merges...) through a generic
    per-value path on np.memmap slices, ~20 us each: 2.8 s to open SmolLM2, several s for 256k vocabs.
    Only the private _get/_get_field_parts are replaced; tests compare the result with the stock reader.
    """

    def _plain(self) -> np.ndarray:
        # Slices of an np.memmap run a Python-level __array_finalize__; a plain view of it does not.
        buf = self.__dict__.get("_plain_buf")
        if buf is None:
            buf = self._plain_buf = self.data.view(np.ndarray)
        return buf

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        arr = self._plain()[offset : offset + itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(int(raw_itype[0]))
        count = int(alen[0])
        offs = orig_offs + 12
        parts: list[np.ndarray] = [raw_itype, alen]
        types: list[Any] = [GGUFValueType.ARRAY] + ([itype] if count else [])
        nptype = self.gguf_scalar_to_np.get(itype)
        if itype == GGUFValueType.STRING:
            buf = self._plain()
            size = len(buf)
            unpack = _U64.unpack_from
            u64 = np.uint64
            append = parts.append
            for _ in range(count):
                start = offs + 8
                end = start + unpack(buf, offs)[0]
                if end > size:
                    raise ValueError(f"string in array at offset {offs} runs past the end of the file")
                append(buf[offs:start].view(u64))
                append(buf[start:end])
                offs = end
            # Same layout as the stock reader: [type, count, len0, str0, len1, str1, ...].
            data = list(range(3, 3 + 2 * count, 2))
        elif nptype is not None:
            block = self._get(offs, nptype, count)
            if len(block) != count:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            parts.extend(block.reshape(count, 1))  # one 1-element view per item, as the stock reader has
            data = list(range(2, 2 + count))
            offs += block.nbytes
        else:  # nested arrays: rare, leave them to the stock code path
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, data, types


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Memory-map a GGUF file; raise CheckpointError if it is missing, not GGUF, or truncated."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)", hint="expected a llama.cpp .gguf file")
    try:
        return _FastGGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        # The reader slices the mmap; a short file shows up as a short slice, a bad view or reshape.
        raise CheckpointError(
            f"{path} is truncated or corrupt: {e}", hint="re-download the file; partial downloads look like this"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e.strerror or e}") from None


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key of the file -> plain Python value (str, int, float, bool or list of those).

    The reader's own header pseudo-keys ("GGUF.version", ...) are left out.
    """
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def release_fields(reader: GGUFReader) -> None:
    """Drop the reader's parsed metadata fields once gguf_metadata has copied them out.

    They hold two numpy views per vocabulary string (~36 MB of Python objects for SmolLM2's 49k
    tokens + 49k merges) that would otherwise stay alive through the weight load and add to peak RSS.
    The tensors (and their mapped data) are kept; `reader.fields` is empty afterwards.
    """
    reader.fields.clear()


def _field_value(field: Any) -> Any:
    main = field.types[0] if field.types else None
    if main == GGUFValueType.STRING:
        return _decode(field.parts[field.data[0]], field.name)
    if main != GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if len(field.types) == 1 or not field.data:
        return []
    sub = field.types[1]
    if sub == GGUFValueType.STRING:
        return [_decode(field.parts[i], field.name) for i in field.data]
    if sub == GGUFValueType.ARRAY:
        return field.contents()
    # One contiguous numpy array then one tolist(): ~100x faster than per-element conversion.
    return np.concatenate([field.parts[i] for i in field.data]).tolist()


def _decode(raw: np.ndarray, key: str) -> str:
    try:
        return raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"GGUF metadata '{key}' holds a string that is not UTF-8: {e}") from None


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
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"GGUF architecture '{arch}' is not supported", hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    names = set(tensor_names)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            raise ConfigError(
                f"GGUF metadata lacks '{full}'", hint="the file was not written by a known llama.cpp converter"
            )
        return meta[full]

    hidden = int(need("embedding_length"))
    heads = int(_per_layer_uniform(need("attention.head_count"), f"{arch}.attention.head_count"))
    kv_heads = int(_per_layer_uniform(get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv"))
    layers = int(need("block_count"))
    # key_length when written (llama.cpp's rule), else Llama's rope.dimension_count, which llama.cpp
    # requires to equal the head size (transformers reads head_dim from it), else n_embd / n_head.
    rot = get("rope.dimension_count")
    head_dim = get("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = rot
    head_dim = int(head_dim or hidden // heads)
    value_dim = int(get("attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise UnsupportedError(f"GGUF attention.value_length {value_dim} differs from key_length {head_dim}")

    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"GGUF metadata has neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens'")
        vocab = len(tokens)

    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [_HF_ARCHITECTURES[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_per_layer_uniform(need("feed_forward_length"), f"{arch}.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32_decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_decimal(get("rope.freq_base", 10000.0)),
        # llama.cpp's converter writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if rot is not None and int(rot) != head_dim:
        config["partial_rotary_factor"] = int(rot) / head_dim  # ModelConfig rejects it with a clear message
    rope_scaling = _rope_scaling(get, config, rope_freqs, _ROPE_FREQS in names)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling

    if arch == "llama":
        config["hidden_act"] = "silu"
        config["attention_bias"] = any(n.startswith("blk.") and n.endswith(".attn_q.bias") for n in names)
        config["mlp_bias"] = any(n.startswith("blk.") and n.endswith(".ffn_up.bias") for n in names)
    else:
        config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"
        for key, default in _GEMMA2_DEFAULTS.items():
            gguf_key = "attention.sliding_window" if key == "sliding_window" else key
            value = get(gguf_key, default)
            config[key] = int(value) if key == "sliding_window" else _f32_decimal(value)
        # llama.cpp scales queries by 1/sqrt(n_embd / n_head) for the 46-layer 27B and by
        # 1/sqrt(head_dim) otherwise (llama_model::load_hparams, after gemma_pytorch's config).
        config["query_pre_attn_scalar"] = hidden // heads if layers == 46 else head_dim
    return config


def gguf_rope_freqs(reader: GGUFReader) -> list[float] | None:
    """The values of the file's `rope_freqs.weight` (per-frequency divisors; Llama 3.x), or None."""
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            return _dequantize(t).float().reshape(-1).tolist()
    return None


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


def _f32_decimal(value: Any) -> Any:
    """A float32 value as the shortest decimal that reads back to it (the converter's input)."""
    if isinstance(value, float) and np.float32(value) == value and math.isfinite(value):
        return float(str(np.float32(value)))
    return value


def _rope_scaling(
    get: Callable[..., Any], config: dict[str, Any], rope_freqs: Sequence[float] | None, has_freqs_tensor: bool
) -> dict[str, Any] | None:
    """HF rope_scaling from llama.cpp's rope.scaling.* keys or its rope_freqs tensor."""
    kind = get("rope.scaling.type")
    if kind is None and get("rope.scale_linear") is not None:  # pre-2024 GGUFs
        kind, factor = "linear", get("rope.scale_linear")
    else:
        factor = get("rope.scaling.factor")
    if kind not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": kind}
        if factor is not None:
            scaling["factor"] = _f32_decimal(factor)
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        if kind == "yarn":
            for gguf_key, hf_key in _YARN_KEYS.items():
                if (value := get(f"rope.scaling.{gguf_key}")) is not None:
                    scaling[hf_key] = _f32_decimal(value)
        return scaling
    if has_freqs_tensor and rope_freqs is None:
        raise ValueError("this GGUF has a rope_freqs tensor: pass gguf_rope_freqs(reader) as rope_freqs")
    if rope_freqs is not None:
        return _llama3_from_rope_freqs(rope_freqs, config["rope_theta"], config["head_dim"])
    return None


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for HF "llama3" scaling (float32 base frequencies, as it has)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs.double().numpy()
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _llama3_from_rope_freqs(rope_freqs: Sequence[float], theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover HF "llama3" rope parameters from llama.cpp's per-frequency divisors.

    The divisors depend on (factor, orig / (high - low), low / (high - low)) only, so orig is fixed to
    the converter's default 8192 and low/high are solved for; the result is checked against the tensor.
    """
    r = np.asarray(rope_freqs, dtype=np.float64)
    if r.shape != (head_dim // 2,):
        raise CheckpointError(f"GGUF rope_freqs has {r.size} values, expected head_dim / 2 = {head_dim // 2}")
    if np.allclose(r, 1.0):
        return None
    factor = float(r.max())
    orig = 8192
    candidates = [(1.0, 4.0)]  # Llama 3.1 / 3.2 / 3.3 all use these
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).double().numpy()
    mid = (r > 1.0 + 1e-6) & (r < factor - 1e-6)
    if mid.sum() >= 2:
        # Inside the ramp 1/r = (1 - s)/factor + s with s = (orig/wavelen - low)/(high - low): linear in 1/wavelen.
        s = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(freqs[mid] / (2 * math.pi), s, 1)
        if slope > 0:
            width = orig / slope
            candidates.append((-intercept * width, -intercept * width + width))
    for low, high in candidates:
        if low <= 0 or high <= low:
            continue
        expected = llama3_rope_factors(theta, head_dim, factor, low, high, orig)
        if np.allclose(expected, r, rtol=1e-4, atol=0):
            return {
                "rope_type": "llama3",
                "factor": _f32_decimal(float(np.float32(factor))),
                "low_freq_factor": round(low, 6),
                "high_freq_factor": round(high, 6),
                "original_max_position_embeddings": orig,
            }
    raise UnsupportedError(
        "GGUF rope_freqs tensor does not match Llama 3 rope scaling", hint="only llama3-style rope_freqs are supported"
    )


# --------------------------------------------------------------------------------------------- tensors


def iter_gguf_tensors(
    reader: GGUFReader, config: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF state-dict name, tensor in HF layout and `dtype`), one tensor at a time, in file order.

    `config` is gguf_config_dict's result. Tensors the model has no parameter for (rope_freqs) are skipped;
    a tensor name this loader does not know raises CheckpointError.
    """
    arch = config.get("model_type")
    if arch not in _BLOCK_NAMES:
        raise UnsupportedError(
            f"GGUF architecture '{arch}' is not supported", hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    n_head = int(config["num_attention_heads"])
    n_kv_head = int(config.get("num_key_value_heads") or n_head)
    n_layers = int(config["num_hidden_layers"])
    for t in reader.tensors:
        hf_name, leaf = hf_tensor_name(arch, t.name, n_layers)
        if hf_name is None:
            continue
        gemma_norm = arch == "gemma2" and leaf.endswith("norm") and t.name.endswith(".weight")
        w = _dequantize(t, torch.float32 if gemma_norm else dtype)
        if arch == "llama" and leaf in ("attn_q", "attn_k"):
            w = _unpermute_qk(w, n_head if leaf == "attn_q" else n_kv_head, t.name)
        if gemma_norm:
            # convert_hf_to_gguf.py stored Gemma's RMSNorm scale as (1 + w) for ggml; HF keeps w.
            # Subtract in fp32 before the cast, as transformers does.
            w = w - 1.0
        _release_pages(reader, t)
        yield hf_name, w.to(dtype)


def _release_pages(reader: GGUFReader, t: Any) -> None:
    """Drop the mapped file pages of a tensor already decoded, so they do not add to peak RSS.

    They are clean file-backed pages: a later read just faults them in again from the file.
    """
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's own mmap object
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = int(t.data_offset) + int(t.n_bytes)
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def block_tensor_names(arch: str) -> Mapping[str, str]:
    """Per-block GGUF leaf name -> HF module path for `arch` (e.g. "attn_q" -> "self_attn.q_proj")."""
    return _BLOCK_NAMES[arch]


def top_tensor_names() -> Mapping[str, str]:
    """Top-level GGUF tensor stem -> HF module path ("token_embd" -> "model.embed_tokens", ...)."""
    return _TOP_NAMES


def hf_tensor_name(arch: str, name: str, n_layers: int) -> tuple[str | None, str]:
    """GGUF tensor name -> (HF state-dict name, GGUF leaf); (None, leaf) for tensors with no parameter
    (rope_freqs). Raises CheckpointError for a name unknown to `arch` or a layer past `n_layers`."""
    if name == _ROPE_FREQS and arch == "llama":
        return None, "rope_freqs"
    m = _BLOCK_RE.fullmatch(name)
    if m:
        layer, leaf, kind = int(m.group(1)), m.group(2), m.group(3)
        module = _BLOCK_NAMES[arch].get(leaf)
        if module is not None:
            if layer >= n_layers:
                raise CheckpointError(f"GGUF tensor '{name}' is for layer {layer}, but the model has {n_layers} layers")
            return f"model.layers.{layer}.{module}.{kind}", leaf
    else:
        m = _TOP_RE.fullmatch(name)
        if m and m.group(1) in _TOP_NAMES:
            return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}", m.group(1)
    raise CheckpointError(
        f"GGUF tensor '{name}' is unknown for architecture '{arch}'", hint="the file may be for a different model type"
    )


def _unpermute_qk(w: torch.Tensor, n_head: int, name: str) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute (rows per head: HF halves -> interleaved pairs)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"GGUF tensor '{name}' has {rows} rows, not a multiple of 2 x {n_head} heads")
    # GGUF row (head, i, half) holds HF row (head, half, i); swap back. Works for weights and biases.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# Elements dequantized at a time (whole rows, at least one): bounds the fp32 temporaries to ~0.5 MB.
# Small enough that glibc reuses the same freed block for every chunk; with 4096-row chunks (9 MB for
# SmolLM2's embedding) the holes they left between weights added ~25 MB to peak RSS. Same speed.
_CHUNK_ELEMENTS = 1 << 17


def _dequantize(t: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of its logical shape in `dtype` (K-quants via gguf-py: float32)."""
    # GGUF lists dims innermost first (ne0 = row length); torch wants them outermost first.
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16) or qtype in _TORCH_DEQUANT:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = np.asarray(t.data).reshape(rows, -1)
        out = torch.empty(rows, shape[-1], dtype=dtype)
        step = max(1, _CHUNK_ELEMENTS // shape[-1])
        for start in range(0, rows, step):
            out[start : start + step] = _rows(data[start : start + step], qtype).reshape(-1, shape[-1])
        return out.reshape(shape)
    try:
        out = torch.from_numpy(_gguf_dequantize(t.data, qtype))
    except NotImplementedError:
        raise UnsupportedError(
            f"GGUF tensor '{t.name}' uses type {qtype.name}, which cannot be dequantized",
            hint="use a GGUF with F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or K-quant tensors",
        ) from None
    return out.reshape(shape)


def _rows(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Some whole rows of a tensor's raw data, decoded (F16/BF16 kept as is, the rest float32)."""
    # np.array copies: the reader's arrays are read-only views of the mmap.
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16))
    if qtype == GGMLQuantizationType.BF16:
        # gguf-py exposes BF16 as raw bytes (rows, 2 * cols); reinterpret them.
        return torch.from_numpy(np.array(data, dtype=np.uint8)).view(torch.bfloat16)
    return _TORCH_DEQUANT[qtype](torch.from_numpy(np.array(data, dtype=np.uint8)))


# Vectorised torch versions of ggml's block formats (ggml-common.h), bit-exact with gguf.quants
# (same float32 ops in the same order) and ~2-4x faster: its numpy code works 16 rows at a time.


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(-1, block_bytes)


def _dq_q8_0(raw: torch.Tensor) -> torch.Tensor:
    # block_q8_0: f16 d, int8 qs[32]; x = qs * d
    b = _blocks(raw, 34)
    d = b[:, :2].view(torch.float16).float()
    out = torch.empty(b.shape[0], 32)
    out.copy_(b[:, 2:].view(torch.int8))
    return out.mul_(d)


def _dq_q4_0(raw: torch.Tensor) -> torch.Tensor:
    # block_q4_0: f16 d, u8 qs[16]; element j is the low nibble of qs[j], element j+16 the high one; x = (q - 8) * d
    b = _blocks(raw, 18)
    d = b[:, :2].view(torch.float16).float()
    q = b[:, 2:]
    out = torch.empty(b.shape[0], 32)
    out[:, :16] = q & 0x0F
    out[:, 16:] = q >> 4
    return out.sub_(8.0).mul_(d)


def _dq_q4_1(raw: torch.Tensor) -> torch.Tensor:
    # block_q4_1: f16 d, f16 m, u8 qs[16] (nibbles as Q4_0); x = q * d + m
    b = _blocks(raw, 20)
    d = b[:, :2].view(torch.float16).float()
    m = b[:, 2:4].view(torch.float16).float()
    q = b[:, 4:]
    out = torch.empty(b.shape[0], 32)
    out[:, :16] = q & 0x0F
    out[:, 16:] = q >> 4
    return out.mul_(d).add_(m)


def _dq_q8_k(raw: torch.Tensor) -> torch.Tensor:
    # block_q8_K: f32 d, int8 qs[256], int16 bsums[16] (sums only speed up dot products); x = qs * d
    b = _blocks(raw, 292)
    d = b[:, :4].view(torch.float32)
    out = torch.empty(b.shape[0], 256)
    out.copy_(b[:, 4:260].view(torch.int8))
    return out.mul_(d)


_TORCH_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _dq_q8_0,
    GGMLQuantizationType.Q4_0: _dq_q4_0,
    GGMLQuantizationType.Q4_1: _dq_q4_1,
    GGMLQuantizationType.Q8_K: _dq_q8_k,
}
