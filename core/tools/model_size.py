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
    """Weight bytes one decode step reads: every weight once (each storage once: weights_bytes), except
    that an embedding table read only by its lookup costs one row. A head tied to the embedding reads the
    whole table (as the head). Embeddings are found by shape (num_embeddings, embedding_dim), so quantized
    tables (GGUF blocks, quant's int8 rows and their scales) count the same way. The KV cache is not counted: at
    benchmark lengths it is small next to the weights."""
    total = weights_bytes(model)
    embeddings = [m for m in model.modules() if hasattr(m, "num_embeddings") and hasattr(m, "embedding_dim")]
    readers = {  # storages some other module reads in full (a tied lm_head, quantized or not)
        t.data_ptr() for m in model.modules() if not any(m is e for e in embeddings)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    }
    counted = {t.data_ptr() for t in unique_tensors(model)}
    for emb in embeddings:
        for t in (*emb.parameters(recurse=False), *emb.buffers(recurse=False)):
            if t.data_ptr() in readers or t.data_ptr() not in counted or t.dim() == 0 or t.shape[0] != emb.num_embeddings:
                continue
            counted.discard(t.data_ptr())  # a table two lookups share is one table
            total -= (t.numel() - t.numel() // emb.num_embeddings) * t.element_size()
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
