"""The torchao schemes (int8 weight-only, int4 weight-only, int8 dynamic): our own Linear modules that
store plain integers + scales, one copy each, read by core.kernels (few tokens) and dequantized for
torch's GEMM (prefill).

Why not torchao's tensor subclasses: on this wheel `Int4WeightOnlyConfig` needs CUDA, the prototype
int4 path skips layers silently, its packed CPU int4 weights depend on the instruction set they were
packed under, and int8 weight-only is only fast under torch.compile. So checkpoints hold plain 4/8-bit
values (portable, `llm_torch_format` in quantization_config says so), and memory holds the same bytes.

One token (decode) goes to core.kernels where it runs: int8 with fp32 activations, int4 with activations
rounded to int8 blocks of 32 (llama.cpp's Q4 x Q8 scheme), int8-dynamic likewise. SmolLM2, 2 threads,
same process, interleaved: int8 decode ~20 tok/s vs ~17 on torch's kernels, int4 (g32) ~24 vs ~20.
From PREFILL_ROWS tokens on (or without the native kernels), dequantized weights in an fp32 GEMM are
faster than torch's int kernels. int8 without the native kernels below PREFILL_ROWS: torch's int8 kernel
on the same int8 rows, activations in bfloat16 (exact for |v| <= 256, which int8-dynamic relies on).
"""

from __future__ import annotations

import torch
from torch import nn

from llm_torch.core.errors import CheckpointError
from llm_torch.core import kernels
from llm_torch.core.kernels import I4Q8, I8, I8Q8, LinearSpec

from .spec import GROUP_SIZES, QuantSpec

FORMAT = "llm-torch-plain-v1"  # plain int8 / two 4-bit values per byte + scales; see module docstring
KERNEL_DTYPE = torch.bfloat16
# From this many tokens per call on, weight-only layers multiply in fp32 by their dequantized weights:
# SmolLM2 prefill, 1 thread (CPU time): 128 tokens fp32 121 tok/s, int8 kernel 67, int8 dequantized 108;
# at 32 tokens kernel and dequantized are equal (63 / 64).
PREFILL_ROWS = 32
# int4 unpacking costs more (measured against torch's int4 kernel: 32 tokens 61 tok/s vs dequantized 35;
# 128 tokens 65 vs 79); below this the native kernel runs.
INT4_PREFILL_ROWS = 96
# Prefill dequantizes this many bytes of fp32 weight rows at a time: memory stays bounded (SmolLM2's tied
# head is 113 MB in fp32) and a chunk stays in the last-level cache for its GEMM.
CHUNK_BYTES = 8 << 20
CONFIG_TYPES = {  # scheme -> torchao config class name (the Hub's quant_type._type)
    "int8": "Int8WeightOnlyConfig",
    "int4": "Int4WeightOnlyConfig",
    "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
}
SCHEME_OF_TYPE = {v: k for k, v in CONFIG_TYPES.items()}
MARKER = "weight_scale"  # a module whose checkpoint has <name>.weight_scale is quantized


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _native(layer, x: torch.Tensor, max_rows: int) -> torch.Tensor | None:
    """y for fewer than max_rows fp32 CPU tokens through core.kernels (the product layer.native_linear()
    describes, the one the native step runs too), or None: more tokens, no native kernels, or none for
    this layer. Below max_rows they beat torch's int kernels and keep fp32 activations."""
    mv = kernels.matvec()
    if mv is None or x.numel() >= max_rows * x.shape[-1] or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    spec = layer.native_linear()
    return None if spec is None else mv.linear(spec, x)


def _dequantized_linear(x: torch.Tensor, n: int, rows, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias for W [n, K] given as rows(start, stop) -> fp32 rows, dequantized CHUNK_BYTES at a time."""
    step = max(1, CHUNK_BYTES // (4 * x.shape[-1]))
    bias = None if bias is None else bias.to(x.dtype)
    if step >= n:
        return torch.nn.functional.linear(x, rows(0, n).to(x.dtype), bias)
    y = x.new_empty(*x.shape[:-1], n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        y[..., start:stop] = torch.nn.functional.linear(x, rows(start, stop).to(x.dtype), None if bias is None else bias[start:stop])
    return y


class QuantModule(nn.Module):
    """Base of our quantized layers. `weight` answers what callers ask a Linear's weight for (dtype and
    device of the activations: CausalLM.new_cache sizes the KV cache from lm_head.weight); it holds nothing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_probe", torch.empty(0), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._probe


# ------------------------------------------------------------------------------------------- int8


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """w [N, K] float -> weight int8 [N, K], weight_scale fp32 [N] (symmetric, per output row)."""
    w = w.float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


class Int8Linear(QuantModule):
    """y = x @ (q * scale)^T + b with int8 q [N, K] read directly by torch._weight_int8pack_mm."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dynamic: bool = False):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.dynamic = dynamic  # int8 activations too (per-token symmetric scales)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.register_buffer("bias", bias)
        # The native kernel's copy of the (bf16-rounded) scales, so decode and prefill use the same ones.
        self.register_buffer("scale_f32", self.scale.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _native(self, x, PREFILL_ROWS)
        if y is not None:
            # core.kernels read the int8 rows with fp32 activations (SmolLM2's matrices per token, 2 threads:
            # 14 ms vs ~30 ms in torch's bf16 kernel); int8-dynamic rounds them to Q8 blocks.
            return y
        h = _flat(x)
        if h.shape[0] >= PREFILL_ROWS:
            # Many tokens: fp32 GEMM on the dequantized weights beats the int8 kernel (compute-bound).
            # Dynamic: activations rounded to their int8 grid first, so the products are those of q_x @ q_w.
            if self.dynamic:
                x_scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-12)
                x = torch.round(x / x_scale) * x_scale
            return _dequantized_linear(x, self.out_features, self.dequantized, self.bias)
        if self.dynamic:
            # Integer activations in [-127, 127] are exact in bf16, so the kernel computes q_x @ q_w.
            x_scale = (h.float().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
            q = torch.round(h.float() / x_scale).to(KERNEL_DTYPE)
            y = torch._weight_int8pack_mm(q, self.qweight, self.scale).to(x.dtype) * x_scale.to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(h.to(KERNEL_DTYPE), self.qweight, self.scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of W in fp32: q * scale."""
        return self.qweight[start:stop].float() * self.scale[start:stop].float()[:, None]

    def native_linear(self) -> LinearSpec | None:
        """This layer for core.engine.native_step: the same kernel and operands as forward's one-token path."""
        if self.dynamic and self.in_features % 32:
            return None
        bias = None if self.bias is None else self.bias.float().contiguous()
        return LinearSpec(I8Q8 if self.dynamic else I8, self.qweight, self.out_features, self.in_features,
                          scale=self.scale_f32, bias=bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8{' dynamic' if self.dynamic else ''}"


class Int8Embedding(QuantModule):
    """Embedding lookup from an int8 table with one scale per token row (--quantize-embeddings); a tied
    head multiplies by the same int8 table (Int8Linear over the same storage)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("row_scale", scale.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.row_scale[ids, None]

    def tied_head(self) -> Int8Linear:
        return Int8Linear(self.qweight, self.row_scale, None)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


# ------------------------------------------------------------------------------------------- int4


def int4_group_size(in_features: int, requested: int) -> int | None:
    """The requested group size, or the largest smaller supported one dividing in_features (None: none does)."""
    for g in sorted((g for g in GROUP_SIZES if g <= requested), reverse=True):
        if in_features % g == 0:
            return g
    return None


def quantize_int4(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w [N, K] -> weight uint8 [N, K/2] (low nibble = even column), weight_scale / weight_zero bf16 [N, K/g].

    Asymmetric per group, in the kernel's convention: w ~= (q - 8) * scale + zero, q in 0..15. Scale and
    zero are rounded to bf16 before q is chosen, so q is the best code for the values the kernel uses.
    """
    N, K = w.shape
    g = w.float().contiguous().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(KERNEL_DTYPE).float()
    zero = (lo + 8 * scale).to(KERNEL_DTYPE).float()
    q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.uint8).view(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return {"weight": packed, "weight_scale": scale.squeeze(-1).to(KERNEL_DTYPE), "weight_zero": zero.squeeze(-1).to(KERNEL_DTYPE)}


class Int4Linear(QuantModule):
    """y = x @ W^T + b from one copy of the weights: the checkpoint's packed codes uint8 [N, K/2] (low nibble
    = even column) and bf16 scale / zero [N, K/g]. Few tokens: core.kernels read them directly; prefill (or
    no native kernels) dequantizes them per call, CHUNK_BYTES of rows at a time, for torch's GEMM."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        N, K = packed.shape[0], packed.shape[1] * 2
        self.in_features, self.out_features = K, N
        self.group_size = K // scale.shape[1]
        # No second, prefill-only copy (torch's CPU int4 packing is not portable to unpack): decode reads
        # exactly these bytes, and `llm bench` counts them.
        self.register_buffer("qweight", packed.contiguous())
        self.register_buffer("scale", scale.to(KERNEL_DTYPE).contiguous())
        self.register_buffer("zero", zero.to(KERNEL_DTYPE).contiguous())
        self.register_buffer("bias", bias)

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of W in fp32: q * scale + (zero - 8 * scale) per group."""
        packed = self.qweight[start:stop]
        n, K, g = packed.shape[0], self.in_features, self.group_size
        q = torch.empty(n, K // 2, 2, device=packed.device)  # nibbles written in place: ~1.4x faster than stack + casts
        q[..., 0] = packed & 15
        q[..., 1] = packed >> 4
        scale, zero = self.scale[start:stop].float(), self.zero[start:stop].float()
        return torch.addcmul((zero - 8 * scale)[:, :, None], q.view(n, K // g, g), scale[:, :, None]).view(n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _native(self, x, INT4_PREFILL_ROWS)
        if y is not None:  # core.kernels read the 4-bit codes; x as Q8 blocks
            return y
        return _dequantized_linear(x, self.out_features, self.dequantized, self.bias)

    def native_linear(self) -> LinearSpec:
        """This layer for core.engine.native_step: the same kernel and operands as forward's one-token path."""
        bias = None if self.bias is None else self.bias.float().contiguous()
        return LinearSpec(I4Q8, self.qweight, self.out_features, self.in_features, scale=self.scale,
                          zero=self.zero, bias=bias, group=self.group_size)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group {self.group_size}"


# ------------------------------------------------------------------------------------- the codec


class TorchaoCodec:
    """Checkpoint tensors <-> modules for one torchao scheme, one checkpoint Linear at a time."""

    backend = "torchao"
    marker = MARKER

    def __init__(self, scheme: str, group_size: int = 128):
        self.scheme = scheme
        self.group_size = group_size

    def plan(self, in_features: int) -> tuple[bool, str | None]:
        """(quantize this layer?, a note for the user when the request cannot be met as asked)."""
        if self.scheme != "int4":
            return True, None
        g = int4_group_size(in_features, self.group_size)
        if g is None:
            return False, f"input size {in_features} is not a multiple of 32: kept in full precision"
        if g != self.group_size:
            return True, f"input size {in_features} is not a multiple of {self.group_size}: group size {g}"
        return True, None

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.scheme == "int4":
            g = int4_group_size(w.shape[1], self.group_size)
            return quantize_int4(w, g)
        return quantize_int8(w)

    def build(self, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
        """The module of one Linear's checkpoint tensors (quantize's, plus its float `bias` if it has one)."""
        bias = tensors.get("bias")
        try:
            if self.scheme == "int4":
                packed, scale, zero = (tensors[k] for k in ("weight", "weight_scale", "weight_zero"))
                if packed.dtype != torch.uint8 or scale.shape != zero.shape or scale.shape[0] != packed.shape[0]:
                    raise ValueError("int4 tensors have inconsistent shapes or dtypes")
                if (packed.shape[1] * 2) % scale.shape[1] or (packed.shape[1] * 2) // scale.shape[1] not in GROUP_SIZES:
                    raise ValueError(f"{scale.shape[1]} groups do not split {packed.shape[1] * 2} inputs into a supported size")
                return Int4Linear(packed, scale, zero, bias)
            q, scale = tensors["weight"], tensors["weight_scale"]
            if q.dtype != torch.int8 or scale.shape != (q.shape[0],):
                raise ValueError("int8 weight / weight_scale have inconsistent shapes or dtypes")
            return Int8Linear(q, scale, bias, dynamic=self.scheme == "int8-dynamic")
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"quantized tensors of '{name}' are unusable: {e}", hint="quantize the float model again with llm quantize") from None

    def config(self, spec: QuantSpec, kept: list[str]) -> dict:
        """quantization_config in the layout transformers' TorchAoConfig writes (+ our tensor format)."""
        data = {"group_size": spec.group_size} if self.scheme == "int4" else {}
        return {
            "quant_method": "torchao",
            "quant_type": {"default": {"_type": CONFIG_TYPES[self.scheme], "_version": 2, "_data": data}},
            "modules_to_not_convert": kept,
            "include_input_output_embeddings": spec.quantize_embeddings,
            "untie_embedding_weights": False,
            "llm_torch_format": FORMAT,
        }
