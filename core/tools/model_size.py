"""Size facts of a loaded model: parameters as the float model counts them (core/placement/sizing.py), weight
bytes in memory, and the weight bytes one decode step reads (what bounds decode speed)."""

from __future__ import annotations

from torch import nn

from llm_torch.core.placement.sizing import param_count, unique_tensors

from .bench_results import ModelInfo


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


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
