"""GGUF blocks kept packed: which kinds (gguf_packing), and the loading step that puts GGUFLinear / GGUFEmbedding
(core/model/gguf_layers.py) where the file's Q4_0 ... Q6_K matrices go, filled with their raw rows.

Packed on the CPU with the default dtype only: there the native kernels multiply the blocks directly, decode
reads ~1/3 of the fp16 bytes (SmolLM2 Q4_1: ~98 MB per token, not 269). An explicit --dtype, a GPU, a device
map or tensor parallelism (shards cut rows the blocks hold) decode at load as before.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Iterator

import torch
from torch import nn

from llm_torch.core import kernels
from llm_torch.core.errors import CheckpointError
from llm_torch.core.model.gguf_layers import GGUFEmbedding, GGUFLinear
from llm_torch.core.model.gguf_quant import FORMATS, NAMES, PackedRows, row_bytes
from llm_torch.core.model.layers import Embedding, Linear


def gguf_packing(device: torch.device) -> frozenset[int]:
    """The GGUF kinds kept packed on `device`: those the native kernels multiply here. A kind they lack is
    decoded at load (fp16), since decoding it again for every token's matmul would cost more than reading fp16."""
    if device.type != "cpu":
        return frozenset()
    mv = kernels.matvec()
    return frozenset() if mv is None else frozenset(FORMATS) & mv.kinds


def packed_weight_bytes(count: int, packed: dict[str, tuple[int, tuple[int, int], int]], dtype: torch.dtype) -> int:
    """Weight bytes of a model of `count` parameters whose `packed` matrices (GGUFCheckpoint.packed_tensors) stay
    blocks and the rest are stored in `dtype`."""
    elements = sum(n * k for _, (n, k), _ in packed.values())
    return (count - elements) * torch.finfo(dtype).bits // 8 + sum(nbytes for _, _, nbytes in packed.values())


class GGUFPacked:
    """The loading step (loading.assign_checkpoint): swaps in the packed modules on the meta-device model, fills
    them from the tensor stream (gguf_quant.PackedRows), passes every other tensor on to assign_weights."""

    def __init__(self, model: nn.Module, checkpoint: Any, kinds: Collection[int], device: torch.device):
        self.device = device
        self.packed = checkpoint.packed_tensors(kinds)
        self.modules: dict[str, GGUFLinear | GGUFEmbedding] = {}
        for name, (kind, (n, k), _) in self.packed.items():
            module_name = name.removesuffix(".weight")
            old = model.get_submodule(module_name)
            meta = torch.empty(n, row_bytes(kind, k), dtype=torch.uint8, device="meta")
            if isinstance(old, Embedding):
                new = GGUFEmbedding(kind, meta, k)
                if getattr(model, "lm_head", None) is not None and model.lm_head.weight is old.weight:
                    # Tied: a head over the same rows once they are read (assign_weights ties it at the end).
                    model.lm_head = new.tied_head()
            elif isinstance(old, Linear):
                new = GGUFLinear(kind, meta, k)
                new.bias = old.bias  # still on the meta device: assign_weights fills it
            else:
                raise CheckpointError(f"GGUF tensor '{name}' is for a {type(old).__name__}, which cannot hold blocks")
            model.set_submodule(module_name, new)
            self.modules[name] = new
        kinds_here = sorted({kind for kind, _, _ in self.packed.values()})
        self.label = "gguf " + "+".join(NAMES[k] for k in kinds_here) if kinds_here else None

    def filter(self, tensors: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            if not isinstance(t, PackedRows):
                yield name, t
                continue
            module = self.modules.get(name)
            if module is None or module.kind != t.kind:
                raise CheckpointError(f"GGUF tensor '{name}' was not announced as {NAMES[t.kind]} by the file header")
            module.load_rows(t.data.to(self.device))

    def finish(self) -> None:
        missing = [name for name, m in self.modules.items() if m.qweight.is_meta]
        if missing:
            raise CheckpointError(f"GGUF tensors {', '.join(missing)} were listed but never read")
