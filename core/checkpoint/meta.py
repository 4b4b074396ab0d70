"""Meta's original Llama / Llama 2 release layout as a conversion source.

    params.json              {"dim", "n_layers", "n_heads", "n_kv_heads"?, "multiple_of", "ffn_dim_multiplier"?, "norm_eps", ...}
    consolidated.00.pth ...  one shard per tensor-parallel rank (pickles: loaded with weights_only=True, mmap=True)
    tokenizer.model          sentencepiece

Shards split each matrix the way Megatron-style tensor parallelism does (as transformers'
convert_llama_weights_to_hf.py merges them): column-parallel layers (wq, wk, wv, w1, w3, output) along
dim 0, row-parallel ones (wo, w2) along dim 1, the embedding along dim 1 (Llama 1/2; the shapes tell),
norms replicated. Meta's q/k rows pair the two halves of each rotary frequency (interleaved, as
complex numbers); HF's rotate-half layout wants them as two halves, so q/k get permuted.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from llm_torch.core.model.bounds import bounded_float, bounded_int
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import CheckpointError, ConfigError, TokenizerError, UnsupportedError
from .base import Checkpoint, TensorInfo, generation_config_for, interleaved_to_halves, selected, spm_tokenizer, write_json
from .resolve import SHARD_RE

# Meta leaf -> (HF module path, dim the shards are concatenated along; None = replicated)
_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_SKIPPED = ("rope.freqs",)  # a buffer, recomputed from rope_theta


def config_from_params(params: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """HF LlamaConfig fields for a params.json (transformers' conversion rules)."""
    if not isinstance(params, dict):
        raise ConfigError("params.json is not a JSON object", hint="is this Meta's original Llama layout?")
    try:
        dim, heads, layers = (bounded_int(field, params[key], "params.json", key) for field, key in
                              (("hidden_size", "dim"), ("num_attention_heads", "n_heads"), ("num_hidden_layers", "n_layers")))
        multiple_of = bounded_int("intermediate_size", params.get("multiple_of", 256), "params.json", "multiple_of")
    except KeyError as e:
        raise ConfigError(f"params.json lacks {e}", hint="is this Meta's original Llama layout?") from None
    # Llama's SwiGLU width: 2/3 of 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of.
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(bounded_float("ffn_dim_multiplier", params["ffn_dim_multiplier"], "params.json", 0.0, 64.0) * hidden)
    intermediate = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    eps = float(params.get("norm_eps", 1e-5))
    # Not in params.json: Llama 1 (norm_eps 1e-6) was trained on 2048 tokens, Llama 2 (1e-5) on 4096.
    context = int(params.get("max_seq_len") or (2048 if eps < 1e-5 else 4096))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": dim,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(params.get("n_kv_heads") or heads),
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": eps,
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


class MetaCheckpoint(Checkpoint):
    kind = "meta"

    def __init__(self, path: Path):
        from llm_torch.core.tokenizer import sentencepiece as sp

        self.warnings = []
        self.path = path
        files = sorted((p for p in path.iterdir() if SHARD_RE.fullmatch(p.name)),
                       key=lambda p: int(SHARD_RE.fullmatch(p.name).group(1)))
        numbers = [int(SHARD_RE.fullmatch(p.name).group(1)) for p in files]
        if numbers != list(range(len(files))):
            raise CheckpointError(f"{path} has shards {numbers}, expected consolidated.00 to {len(files) - 1:02d}",
                                  hint="a shard is missing; download it again")
        try:
            params = json.loads((path / "params.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path / 'params.json'} is not valid JSON: {e}") from None
        spm_file = path / "tokenizer.model"
        self._spm = sp.read_model(spm_file) if spm_file.is_file() else None
        self._shards = [self._load(f) for f in files]
        first = self._shards[0]
        if "tok_embeddings.weight" not in first:
            raise CheckpointError(f"{files[0].name} has no tok_embeddings.weight", hint="is this a Llama checkpoint?")
        dim = int(params.get("dim", 0))
        emb = first["tok_embeddings.weight"]
        # Llama 1/2 split the embedding along the hidden dim, Llama 3 along the vocabulary.
        self._embed_dim = 1 if len(files) > 1 and emb.shape[1] != dim else 0
        vocab = int(params.get("vocab_size") or -1)
        if vocab <= 0:
            vocab = emb.shape[0] * (len(files) if self._embed_dim == 0 else 1)
        self.config_dict = config_from_params(params, vocab)
        if self._spm is not None:
            self.config_dict.update(bos_token_id=self._spm.bos_id, eos_token_id=self._spm.eos_id)
            if self._spm.pad_id >= 0:
                self.config_dict["pad_token_id"] = self._spm.pad_id
        self.config_dict["torch_dtype"] = str(emb.dtype).removeprefix("torch.")
        self.config = ModelConfig.from_dict(self.config_dict)
        self.tensors = self._plan()

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle / zip errors of every kind: the file is not a loadable checkpoint
            raise CheckpointError(f"cannot load {file.name} safely: {e}",
                                  hint="the file is truncated, or holds more than tensors (refused for safety)") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file.name} is not a state dict of tensors")
        return state

    def _plan(self) -> list[TensorInfo]:
        cfg, n = self.config, len(self._shards)
        out = []
        self._sources: dict[str, str] = {}  # HF name -> Meta key
        for key, t in self._shards[0].items():
            if key in _SKIPPED:
                continue
            hf, dim = self._target(key)
            self._sources[hf] = key
            shape = list(t.shape)
            if dim is not None and n > 1:
                shape[dim] = sum(int(s[key].shape[dim]) for s in self._shards)
            out.append(TensorInfo(hf, tuple(shape), t.dtype))
        for s in self._shards[1:]:
            if set(s) != set(self._shards[0]):
                raise CheckpointError("the consolidated.*.pth shards hold different tensor names",
                                      hint="the shards come from different checkpoints")
        expect = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
        for t in out:
            if t.name in expect and t.shape != expect[t.name]:
                raise CheckpointError(f"merged {t.name} has shape {t.shape}, params.json implies {expect[t.name]}")
        return out

    def _target(self, key: str) -> tuple[str, int | None]:
        if key in _TOP:
            dim = {"tok_embeddings.weight": self._embed_dim, "norm.weight": None, "output.weight": 0}[key]
            return _TOP[key], dim
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m and m.group(2) in _LAYER:
            leaf, dim = _LAYER[m.group(2)]
            return f"model.layers.{m.group(1)}.{leaf}", dim
        raise UnsupportedError(f"tensor '{key}' of the Meta checkpoint is unknown",
                               hint="only Llama 1/2 style consolidated checkpoints are supported")

    def read(self, dtype: torch.dtype | None, select=None) -> Iterator[tuple[str, torch.Tensor]]:
        # Shards merged and q/k rows un-interleaved one tensor at a time, then cut to `select`.
        return selected(self._merged(dtype), select)

    def _merged(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        for info in self.tensors:
            key = self._sources[info.name]
            _, dim = self._target(key)
            parts = [s[key] for s in self._shards]
            w = parts[0].clone() if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            if key.endswith("attention.wq.weight"):
                w = interleaved_to_halves(w, cfg.num_attention_heads)
            elif key.endswith("attention.wk.weight"):
                w = interleaved_to_halves(w, cfg.num_key_value_heads)
            for p in parts:
                _release(p)
            yield info.name, (w if dtype is None else w.to(dtype)).contiguous()

    def tokenizer(self):
        if self._spm is None:
            raise TokenizerError(f"{self.path} has no tokenizer.model", hint="copy Meta's tokenizer.model next to params.json")
        return spm_tokenizer(self.path / "tokenizer.model", None)

    def write_tokenizer_files(self, folder: Path) -> None:
        from llm_torch.core.tokenizer import sentencepiece as sp

        if self._spm is None:
            self.warnings.append(f"{self.path} has no tokenizer.model: the output has weights and config but no tokenizer")
            write_json(folder / "generation_config.json", generation_config_for(self.config))
            return
        (folder / "tokenizer.json").write_text(sp.to_backend(self._spm).to_str(), encoding="utf-8")
        write_json(folder / "tokenizer_config.json", sp.tokenizer_config(self._spm, None, self.config.max_position_embeddings))
        write_json(folder / "generation_config.json", generation_config_for(self.config))

    def sentencepiece_model(self):
        return self._spm

    def close(self) -> None:
        self._shards = []


_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _madvise = None


def _release(t: torch.Tensor) -> None:
    """Drop the resident file pages behind a memory-mapped tensor already converted.

    Shards are opened with weights_only=True and mmap=True, a private mapping: pages read stay in RSS until
    unmapped. Nothing wrote to them, so MADV_DONTNEED only forgets them (a later read refaults them
    from the file) and peak RSS stays near one tensor instead of the whole checkpoint.
    """
    if _madvise is None or _MADV_DONTNEED is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    # Only whole pages inside the tensor: a neighbour's bytes on a shared page stay mapped.
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
