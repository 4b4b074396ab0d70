"""ggml's block formats (ggml-common.h) decoded in torch: Q4_0, Q4_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K,
keyed by the kernels' kind codes (core/kernels). Vectorised and bit-exact with gguf-py's gguf.quants.dequantize
(the same float32 ops in the same order; tests/test_gguf_packed.py compares them).

The GGUF loader keeps such tensors as raw blocks, one output row per byte row (GGUFLinear, GGUFEmbedding in
gguf_layers.py); these functions decode whole rows when the kernels do not multiply them directly.
core/model never imports gguf-py: core/checkpoint maps its GGMLQuantizationType to these kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from llm_torch.core.kernels import Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0

QK_K = 256
_SHIFT_2 = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
_SHIFT_4 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
_SHIFT_8 = torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> their fp16 value widened to fp32 [rows, 1] (contiguous copy: views of a slice)."""
    return b.contiguous().view(torch.float16).float()


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # block_q8_0: f16 d, int8 qs[32]; x = qs * d
    out = b[:, 2:].contiguous().view(torch.int8).float()
    return out.mul_(_f16(b[:, :2]))


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    # Element j is the low nibble of qs[j], element j + 16 the high one.
    out = torch.empty(q.shape[0], 32)
    out[:, :16] = q & 0x0F
    out[:, 16:] = q >> 4
    return out


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # block_q4_0: f16 d, u8 qs[16]; x = (q - 8) * d
    return _nibbles(b[:, 2:]).sub_(8.0).mul_(_f16(b[:, :2]))


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    # block_q4_1: f16 d, f16 m, u8 qs[16]; x = q * d + m
    return _nibbles(b[:, 4:]).mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block (gguf-py's get_scale_min)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Q4_K / Q5_K: f16 d, f16 dmin, 12 scale bytes; x = (d * sc) * q - dmin * m per sub-block of 32
    n = b.shape[0]
    sc, mn = _scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs = (b[:, 16:].reshape(n, -1, 1, 32) >> _SHIFT_2) & 0x0F
    return _k_affine(b, qs.reshape(n, -1, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = ((qs.reshape(n, -1, 1, 32) >> _SHIFT_2) & 0x0F).reshape(n, -1, 32)
    hi = ((qh.reshape(n, -1, 1, 32) >> _SHIFT_8) & 0x01).reshape(n, -1, 32)
    return _k_affine(b, ql | (hi << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # block_q6_K: u8 ql[128], u8 qh[64], int8 scales[16], f16 d; x = d * scale * (q - 32) per 16
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    lo = ((ql.reshape(n, -1, 1, 64) >> _SHIFT_2) & 0x0F).reshape(n, -1, 32)
    hi = ((qh.reshape(n, -1, 1, 32) >> _SHIFT_4) & 0x03).reshape(n, -1, 32)
    q = ((lo | (hi << 4)).view(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


# kind -> (elements per block, bytes per block, decoder of blocks [n, bytes] -> fp32 [n, elements])
FORMATS: dict[int, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    Q4_0: (32, 18, _q4_0), Q4_1: (32, 20, _q4_1), Q8_0: (32, 34, _q8_0),
    Q4_K: (QK_K, 144, _q4_k), Q5_K: (QK_K, 176, _q5_k), Q6_K: (QK_K, 210, _q6_k),
}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


def row_bytes(kind: int, k: int) -> int:
    """Bytes of one packed row of k elements (k a multiple of the kind's block)."""
    elems, nbytes, _ = FORMATS[kind]
    return k // elems * nbytes


def dequantize_rows(kind: int, raw: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw uint8 [..., row_bytes] (whole rows of blocks) -> [..., k] in `dtype` (decoded in fp32, then cast)."""
    elems, nbytes, decode = FORMATS[kind]
    lead = raw.shape[:-1]
    out = decode(raw.reshape(-1, nbytes)).reshape(*lead, k)
    return out if dtype == torch.float32 else out.to(dtype)


@dataclass(frozen=True)
class PackedRows:
    """A weight as the GGUF file stores it: `data` uint8 [rows, row_bytes] of `kind` blocks, rows of k values
    (what the loader hands GGUFLinear / GGUFEmbedding instead of a decoded tensor)."""

    kind: int
    data: torch.Tensor
    k: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.k)
