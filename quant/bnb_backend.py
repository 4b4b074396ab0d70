"""The bitsandbytes schemes: 4-bit NF4 / FP4 (optionally double-quantized) and LLM.int8(), stored in the
layout transformers writes for `BitsAndBytesConfig`, so Hub checkpoints load and ours load in transformers.

On CPU (bitsandbytes 0.50) 4-bit layers decode ~5-15x slower than fp32 (`matmul_4bit` dequantizes each
call): they are for memory savings only. LLM.int8() weights are plain int8 + one absmax per row, so
they run through the int8 weight kernel with full-precision activations (no activation quantization,
hence no outlier decomposition: at least as accurate as bitsandbytes' own matmul).
"""

from __future__ import annotations

import torch
from torch import nn

from llm_torch.core.errors import CheckpointError

from .spec import QuantSpec
from .int_layers import QuantModule

BLOCKSIZE = 64  # transformers' default for 4-bit


def _bnb():
    import logging
    import os
    import warnings

    # Its import logs warnings about optional kernels (on AVX512-BF16 CPUs: "Failed to load CPU
    # gemm_4bit_forward ... pip install kernels") that say nothing about our results: off stderr unless LLM_DEBUG.
    quiet = not os.environ.get("LLM_DEBUG")
    log = logging.getLogger("bitsandbytes")
    level = log.level
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
                log.setLevel(logging.ERROR)
            import bitsandbytes
            import bitsandbytes.functional as F
    except ImportError as e:
        from llm_torch.core.errors import UnsupportedError

        raise UnsupportedError(f"the bitsandbytes schemes need the bitsandbytes package ({e})",
                               hint="pip install bitsandbytes, or use --int8 / --int4 (torchao schemes)") from None
    finally:
        log.setLevel(level)
    return bitsandbytes, F


class Linear4bit(QuantModule):
    """y = x @ dequant(W)^T + b through bitsandbytes.matmul_4bit (W packed two codes per byte)."""

    def __init__(self, packed: torch.Tensor, quant_state, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = quant_state.shape
        self.register_buffer("qweight", packed)
        self.register_buffer("absmax", quant_state.absmax)
        self.quant_state = quant_state
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb, _ = _bnb()
        self.quant_state.absmax = self.absmax  # follows .to(device)
        y = bnb.matmul_4bit(x.float(), self.qweight.t(), quant_state=self.quant_state).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.quant_state.quant_type}"


class BnbCodec:
    backend = "bitsandbytes"

    def __init__(self, scheme: str, double_quant: bool = False):
        self.scheme = scheme
        self.double_quant = double_quant
        self.four_bit = scheme in ("nf4", "fp4")
        self.marker = f"weight.quant_state.bitsandbytes__{scheme}" if self.four_bit else "SCB"

    def plan(self, in_features: int) -> tuple[bool, str | None]:
        return True, None

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        _, F = _bnb()
        if self.four_bit:
            packed, state = F.quantize_4bit(w.float().contiguous(), blocksize=BLOCKSIZE, compress_statistics=self.double_quant,
                                            quant_type=self.scheme, quant_storage=torch.uint8)
            return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        # LLM.int8(): bitsandbytes quantizes from fp16 (as transformers does), one absmax per row.
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return {"weight": cb, "SCB": scb.float(), "weight_format": torch.tensor(0, dtype=torch.uint8)}

    def build(self, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
        """The module of one Linear's checkpoint tensors (quantize's, plus its float `bias` if it has one)."""
        bias = tensors.get("bias")
        try:
            if not self.four_bit:
                from .int_layers import Int8Linear

                q, scb = tensors["weight"], tensors["SCB"].float()
                if q.dtype != torch.int8 or scb.shape != (q.shape[0],):
                    raise ValueError("weight / SCB have inconsistent shapes or dtypes")
                return Int8Linear(q, scb / 127.0, bias)
            return self._build_4bit(tensors, bias)
        except (KeyError, ValueError, RuntimeError, AssertionError) as e:
            raise CheckpointError(f"bitsandbytes tensors of '{name}' are unusable: {e or type(e).__name__}",
                                  hint="re-create the checkpoint") from None

    def _build_4bit(self, tensors, bias) -> nn.Module:
        _, F = _bnb()
        state = F.QuantState.from_dict({k[len("weight."):]: v for k, v in tensors.items() if k.startswith("weight.")},
                                       device=torch.device("cpu"))
        if state.nested:
            # Double-quantized block scales are expanded to fp32 (1/16 byte per weight more): the layer's
            # state is then one absmax tensor, which follows the module's .to(device).
            scales = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        else:
            scales = state.absmax.float()
        rows, cols = state.shape
        packed = tensors["weight"]
        if (rows * cols) % state.blocksize or packed.numel() * 2 != rows * cols:
            raise ValueError(f"packed size {packed.numel()} does not hold a {rows}x{cols} weight")
        state = F.QuantState(absmax=scales.float(), shape=torch.Size((rows, cols)), code=state.code,
                             blocksize=state.blocksize, quant_type=state.quant_type, dtype=torch.float32)
        return Linear4bit(packed.reshape(-1, 1), state, bias)

    def config(self, spec: QuantSpec, kept: list[str]) -> dict:
        """quantization_config as transformers' BitsAndBytesConfig.to_dict() writes it."""
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": self.four_bit,
            "_load_in_8bit": not self.four_bit,
            "load_in_4bit": self.four_bit,
            "load_in_8bit": not self.four_bit,
            "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.scheme if self.four_bit else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": kept or None,
            "llm_int8_threshold": 6.0,
        }
