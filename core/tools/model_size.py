"""Size facts of a loaded model: parameters as the float model counts them (core/placement/sizing.py), weight
bytes in memory, and the weight bytes one decode step reads (what bounds decode speed)."""

from __future__ import annotations

import torch
from torch import nn

from llm_torch.core.placement.sizing import param_count, unique_tensors

from .bench_results import ModelInfo


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every weight once, except that an embedding table read only
    by its lookup costs one row. A head tied to the embedding reads the whole table (as the head).
    Packed tables (an int `qweight` buffer: GGUF blocks, quant's int8) count their bytes like float ones.
    The KV cache is not counted: at benchmark lengths it is small next to the weights."""
    total = weights_bytes(model)
    readers = {_matrix(m).data_ptr() for m in model.modules() if hasattr(m, "in_features")}  # nn.Linear and kin
    for m in model.modules():
        if not hasattr(m, "num_embeddings"):
            continue
        w = _matrix(m)
        if w.data_ptr() in readers:
            continue
        row = w[0].numel() * w.element_size()
        total -= w.numel() * w.element_size() - row
    return total


def _matrix(m: nn.Module) -> torch.Tensor:
    """What a linear or embedding module stores its matrix in: a packed `qweight`, else its weight."""
    q = m._buffers.get("qweight")
    return q if q is not None else m.weight


def model_info(loaded) -> ModelInfo:
    model = loaded.model
    params = param_count(model)
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
