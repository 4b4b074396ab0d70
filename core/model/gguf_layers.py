"""Layers over GGUF blocks kept as they are in the file (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K; gguf_quant.py):
a uint8 buffer `qweight` [out rows, row bytes], never dequantized at load. A few rows (decode) are multiplied by
the native kernels straight from the blocks where they know the kind (the same LinearSpec the native step
runs); many rows (prefill), or a kind the kernels lack, decode the weight to the activations' dtype for one
torch matmul. An embedding decodes only the rows it looks up; a head tied to it reads the same buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_torch.core import kernels

from .gguf_quant import NAMES, dequantize_rows, row_bytes

# From this many rows per call on, one GEMM over the decoded weight beats the block kernels (compute-bound),
# as quant/int_layers.py measured for its int8 / int4 rows (PREFILL_ROWS there).
PREFILL_ROWS = 32


class _Packed(nn.Module):
    """Shared by GGUFLinear and GGUFEmbedding: `weight` answers what callers ask a Linear's or Embedding's
    weight for (the activations' dtype and device: CausalLM.new_cache, DecoderModel.embed); it holds nothing."""

    def __init__(self, kind: int, qweight: torch.Tensor, k: int):
        super().__init__()
        self.kind, self._k = kind, k
        self.register_buffer("qweight", None)
        self.register_buffer("_probe", None, persistent=False)
        self.load_rows(qweight)

    def load_rows(self, qweight: torch.Tensor) -> None:
        """Hold these packed rows (the loader fills a module built on the meta device)."""
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != row_bytes(self.kind, self._k):
            raise ValueError(f"{NAMES[self.kind]} rows of {self._k} values take {row_bytes(self.kind, self._k)} "
                             f"bytes, not {tuple(qweight.shape)} {qweight.dtype}")
        self.qweight = qweight
        self._probe = torch.empty(0, device=qweight.device)

    @property
    def weight(self) -> torch.Tensor:
        return self._probe


class GGUFLinear(_Packed):
    """y = x @ W^T (+ bias) with W [out_features, in_features] as GGUF blocks, one packed row per output."""

    def __init__(self, kind: int, qweight: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__(kind, qweight, in_features)
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def native_linear(self) -> kernels.LinearSpec | None:
        """This layer for the native kernels (MatVec.linear, core/engine/native_step.py): the raw rows."""
        if self.qweight.device.type != "cpu" or not self.qweight.is_contiguous():
            return None
        bias = None if self.bias is None else self.bias.detach().float().contiguous()
        return kernels.LinearSpec(self.kind, self.qweight, self.out_features, self.in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mv = kernels.matvec()
        if (mv is not None and self.kind in mv.kinds and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.numel() < PREFILL_ROWS * self.in_features):
            spec = self.native_linear()
            if spec is not None:
                return mv.linear(spec, x)
        w = dequantize_rows(self.kind, self.qweight, self.in_features, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, gguf {NAMES[self.kind]}"


class GGUFEmbedding(_Packed):
    """Embedding lookup from a table of GGUF blocks (one packed row per token); decodes the rows looked up."""

    def __init__(self, kind: int, qweight: torch.Tensor, embedding_dim: int):
        super().__init__(kind, qweight, embedding_dim)
        self.num_embeddings, self.embedding_dim = qweight.shape[0], embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.kind, self.qweight[ids], self.embedding_dim)

    def tied_head(self) -> GGUFLinear:
        """The LM head over this table: the same buffer, nothing kept twice."""
        return GGUFLinear(self.kind, self.qweight, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf {NAMES[self.kind]}"
