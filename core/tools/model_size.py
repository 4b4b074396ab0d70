"""Size facts of a loaded model: parameters as the float model counts them, weight bytes in memory, and the
weight bytes one decode step reads (what bounds decode speed)."""

from __future__ import annotations

import torch
from torch import nn

from .bench_results import ModelInfo


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
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
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_parameters(model))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every weight once, except that an embedding table read only
    by its lookup costs one row. A head tied to the embedding reads the whole table (as the head).
    The KV cache is not counted: at benchmark lengths it is small next to the weights."""
    total = weights_bytes(model)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    readers = {  # storages read in full by some other module (a tied lm_head is an nn.Linear)
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)
    }
    for emb in embeddings:
        w = emb.weight
        if w.data_ptr() in readers:
            continue
        row = w.shape[1] * w.element_size()
        total -= w.numel() * w.element_size() - row
    return total


def logical_params(model) -> int:
    """Parameters as the float model counts them: quantized layers (an int `qweight` buffer, quant's
    torchao-scheme modules) count their out x in weights, not their packed bytes; tied tensors once."""
    seen, total = set(), 0
    for m in model.modules():
        q = m._buffers.get("qweight")
        if q is not None:
            if q.data_ptr() not in seen:
                seen.add(q.data_ptr())
                rows = getattr(m, "out_features", None) or m.num_embeddings
                cols = getattr(m, "in_features", None) or m.embedding_dim
                total += rows * cols
            continue
        for p in m.parameters(recurse=False):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def model_info(loaded) -> ModelInfo:
    model = loaded.model
    params = logical_params(model)
    device = next(model.parameters()).device
    return ModelInfo(
        name=loaded.name,
        dtype=loaded.dtype_name,
        device=str(device),
        params=params,
        weights_bytes=weights_bytes(model),
        bytes_per_token=weight_bytes_per_token(model),
        quantization=loaded.quantization,
    )
