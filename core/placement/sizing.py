"""How big a model is, counted in one place: parameters from the module tree itself (built on the meta device
from a config, or the loaded model), KV cache bytes from the cache's own formula (core/model/kv_cache.py).
The memory check (memory.py), the device map (device_map.py), the dry run and the bench's size facts
(core/tools/model_size.py) all ask here, so a bias or a tied head is counted the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_torch.core.engine.engine import EngineConfig
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.kv_cache import KVCache, resolve_format

# The engine's sliding-window rings hold window + one prefill chunk (kv_cache.py): the default chunk.
RING_MARGIN = EngineConfig.prefill_chunk


def storage_key(t: torch.Tensor) -> int:
    """One key per storage: tied tensors share theirs. Meta tensors have no storage (data_ptr 0), so the
    tensor object stands for it (a tied parameter is the same object)."""
    return id(t) if t.device.type == "meta" else t.data_ptr()


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers (quantized weights may live in buffers), each storage once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    non_persistent = {
        id(b)
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None and name in m._non_persistent_buffers_set
    }
    for t in list(model.parameters()) + [b for b in model.buffers() if id(b) not in non_persistent]:
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def param_count(model: nn.Module, seen: set[int] | None = None) -> int:
    """Parameters as the float model counts them: a quantized layer (an int `qweight` buffer: quant's layers)
    counts its out x in weights, not its packed bytes; a tensor shared by several modules (a tied head) once.
    seen: storage keys already counted, shared between calls that split one model into parts."""
    seen = set() if seen is None else seen
    total = 0
    for m in model.modules():
        q = m._buffers.get("qweight")
        if q is not None:
            if storage_key(q) not in seen:
                seen.add(storage_key(q))
                rows = getattr(m, "out_features", None) or m.num_embeddings
                cols = getattr(m, "in_features", None) or m.embedding_dim
                total += rows * cols
            continue
        for p in m.parameters(recurse=False):
            if storage_key(p) not in seen:
                seen.add(storage_key(p))
                total += p.numel()
    return total


@dataclass(frozen=True)
class ParamCounts:
    """A model's parameters by where a device map can put them."""

    embed: int
    layers: tuple[int, ...]  # per decoder layer
    head: int  # the final norm and the head's own weights (none for a head tied to the embedding)

    @property
    def total(self) -> int:
        return self.embed + sum(self.layers) + self.head


def param_counts(config: ModelConfig, head: str = "causal_lm") -> ParamCounts:
    """The parameters of the model `config` describes, counted on its module tree built on the meta
    device (no memory): biases, norms and tied weights exactly as loading builds them."""
    from llm_torch.core.model.model import HEADS, DecoderModel

    with torch.device("meta"):
        model = HEADS[head](config)
    # under `model`, `transformer` (QA) or the model itself (feature extraction)
    decoder = next(m for m in model.modules() if isinstance(m, DecoderModel))
    seen: set[int] = set()
    embed = param_count(decoder.embed_tokens, seen)
    layers = tuple(param_count(layer, seen) for layer in decoder.layers)
    return ParamCounts(embed, layers, param_count(model, seen))


def weight_bytes(count: int, dtype: torch.dtype) -> int:
    return count * torch.finfo(dtype).bits // 8


def kv_format(dtype: torch.dtype, device: torch.device | str, kv_cache: str = "auto", quantized: bool = False) -> str:
    """The KV format (kv_cache.FORMATS) the engine's cache stores for weights in `dtype` (quantized: int8 / int4
    layers) on `device`, --kv-cache being `kv_cache` (as CausalLM.kv_format decides it once loaded)."""
    return resolve_format(kv_cache, dtype, torch.device(torch.device(device).type), quantized)


def kv_layer_bytes(config: ModelConfig, context: int, dtype: torch.dtype, device: torch.device | str,
                   slots: int = 1, kv_cache: str = "auto", quantized: bool = False) -> list[int]:
    """KV cache bytes per layer the engine's cache takes for `slots` sequences of `context` positions on
    `device`, with weights stored in `dtype`: keys and values in kv_format's format, sliding layers keeping
    window + RING_MARGIN positions."""
    return KVCache.layer_bytes(config, slots, context, RING_MARGIN, kv_format(dtype, device, kv_cache, quantized))
