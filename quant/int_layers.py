"""The torchao schemes (int8 weight-only, int4 weight-only, int8 dynamic): our own Linear modules that
store plain integers + scales and call torch's CPU kernels (the ones torchao dispatches to) directly.

Why not torchao's tensor subclasses: on this wheel `Int4WeightOnlyConfig` needs CUDA, the prototype
int4 path skips layers silently, its packed CPU int4 weights depend on the instruction set they were
packed under, and int8 weight-only is only fast under torch.compile. So checkpoints hold plain 4/8-bit
values (portable, `llm_torch_format` in quantization_config says so) and are packed at load time.

Activations go to the kernels in bfloat16 (fp32 activations take a ~25x slower path for int4; bf16
is exact for |v| <= 256, which the int8 dynamic scheme relies on), and outputs come back in x's dtype.
Measured per call (3072x576 weight, 1 thread, cache-cold): fp32 mv 0.57 ms, int8 0.39 ms, int4 0.41 ms.
From PREFILL_ROWS tokens on, dequantized weights in an fp32 GEMM are faster than the kernels.
One token (decode) goes to core.kernels where it runs: int8 with fp32 activations, int4 with activations
rounded to int8 blocks of 32 (llama.cpp's Q4 x Q8 scheme), int8-dynamic likewise. SmolLM2, 2 threads,
same process, interleaved: int8 decode ~20 tok/s vs ~17 on torch's kernels, int4 (g32) ~24 vs ~20.
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
# int4 unpacking costs more: 32 tokens kernel 61 tok/s vs dequantized 35; 128 tokens 65 vs 79.
INT4_PREFILL_ROWS = 96
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
            w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
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


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int32 [N, K] values 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1).to(torch.int32)


class Int4Linear(QuantModule):
    """y = x @ W^T + b, W in torch's CPU int4 packing (made here, at load: it depends on the CPU)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        N, K = packed.shape[0], packed.shape[1] * 2
        self.in_features, self.out_features = K, N
        self.group_size = K // scale.shape[1]
        q = unpack_int4(packed)
        scale, zero = scale.to(KERNEL_DTYPE), zero.to(KERNEL_DTYPE)
        pad = -N % 16  # the packing needs N % 16 == 0: extra rows of zeros, sliced off the output
        if pad:
            q = torch.cat([q, q.new_full((pad, K), 8)])
            scale, zero = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])]), torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())  # [K/g, N, 2]
        self.register_buffer("bias", bias)
        # The checkpoint's plain codes too (+0.5 byte per weight): prefill dequantizes them for an fp32
        # GEMM (1.9x faster than the kernel at 128 tokens); the packed copy cannot be unpacked portably.
        self.register_buffer("plain", packed)
        # bf16 scales/zeros [N, K/g], as the kernels use them: core.kernels' one-token product reads
        # them directly, prefill's dequantization widens them.
        self.register_buffer("plain_scale", scale[:N].contiguous())
        self.register_buffer("plain_zero", zero[:N].contiguous())

    def dequantized(self) -> torch.Tensor:
        """W [N, K] in fp32: q * scale + (zero - 8 * scale) per group."""
        N, K, g = self.out_features, self.in_features, self.group_size
        q = torch.empty(N, K // 2, 2)  # nibbles written in place: ~1.4x faster than stack + casts
        q[..., 0] = self.plain & 15
        q[..., 1] = self.plain >> 4
        scale, zero = self.plain_scale.float(), self.plain_zero.float()
        return torch.addcmul((zero - 8 * scale)[:, :, None], q.view(N, K // g, g), scale[:, :, None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _native(self, x, INT4_PREFILL_ROWS)
        if y is not None:  # core.kernels read the plain 4-bit codes; x as Q8 blocks (faster than torch's bf16 kernel)
            return y
        if x.numel() >= INT4_PREFILL_ROWS * x.shape[-1]:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.dequantized().to(x.dtype), bias)
        h = _flat(x).to(KERNEL_DTYPE)
        y = torch._weight_int4pack_mm_for_cpu(h, self.qweight, self.group_size, self.scales_and_zeros)
        y = y[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def native_linear(self) -> LinearSpec:
        """This layer for core.engine.native_step: the same kernel and operands as forward's one-token path."""
        bias = None if self.bias is None else self.bias.float().contiguous()
        return LinearSpec(I4Q8, self.plain, self.out_features, self.in_features, scale=self.plain_scale,
                          zero=self.plain_zero, bias=bias, group=self.group_size)

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
