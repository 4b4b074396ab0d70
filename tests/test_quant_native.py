"""Quantized layers on the native kernels (core/kernels): products of a few tokens equal the dequantized
weights' fp32 product (each row bitwise what it is alone), and prefill-sized inputs take torch's GEMM."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core import kernels
from llm_torch.quant import int_layers as tb

native = kernels.matvec()
pytestmark = pytest.mark.skipif(native is None, reason=f"native kernels unavailable here: {kernels.status().detail}")


def relative_error(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> float:
    ref = x.double() @ w.double().T + bias.double()
    return ((got.double() - ref).abs().max() / (x.double().abs() @ w.double().abs().T).max()).item()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_few_tokens_use_the_native_kernel_and_equal_the_dequantized_product(scheme, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w, bias, x = torch.randn(96, 576, generator=g), torch.randn(96, generator=g), torch.randn(1, 1, 576, generator=g)
    if scheme == "int8":
        t = tb.quantize_int8(w)
        layer = tb.Int8Linear(t["weight"], t["weight_scale"], bias)
        dense = t["weight"].float() * layer.scale.float()[:, None]
    else:
        t = tb.quantize_int4(w, 64)
        layer = tb.Int4Linear(t["weight"], t["weight_scale"], t["weight_zero"], bias)
        dense = layer.dequantized()
    calls = []
    real = getattr(native, scheme)
    monkeypatch.setattr(native, scheme, lambda *a, **k: calls.append(k) or real(*a, **k))
    y = layer(x)
    assert len(calls) == 1 and y.shape == (1, 1, 96)
    # int8: fp32 activations, the exact product to fp32 rounding; int4: x rounded to Q8 blocks (< 1%).
    assert relative_error(y.view(1, -1), dense, x.view(1, -1), bias) < (1e-6 if scheme == "int8" else 1e-2)
    # Two tokens: the same kernel, each row bitwise the one-token result.
    y2 = layer(x.expand(1, 2, 576).contiguous())
    assert len(calls) == 2 and torch.equal(y2[0, 1], y.view(-1))
    # A prefill-sized input takes the dequantized weights' fp32 GEMM: the same values to fp32 rounding.
    rows = tb.INT4_PREFILL_ROWS if scheme == "int4" else tb.PREFILL_ROWS
    y3 = layer(x.expand(1, rows, 576).contiguous())
    assert len(calls) == 2
    assert relative_error(y3[0, :1], dense, x.view(1, -1), bias) < (1e-6 if scheme == "int8" else 1e-2)


def test_int8_dynamic_rounds_activations_to_q8_blocks():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 576, generator=g), torch.randn(1, 1, 576, generator=g)
    t = tb.quantize_int8(w)
    layer = tb.Int8Linear(t["weight"], t["weight_scale"], None, dynamic=True)
    dense = t["weight"].float() * layer.scale.float()[:, None]
    y = layer(x)
    # Within half a Q8 step of x per input (x rounded per block of 32 to max|x| / 127).
    step = x.abs().view(-1, 32).amax(-1).repeat_interleave(32) / 127
    bound = (dense.abs().double() @ (step.double() / 2)).max().item() * 1.001
    assert (y.view(-1).double() - dense.double() @ x.view(-1).double()).abs().max().item() <= bound


def test_saved_files_get_ordinary_permissions(tmp_path):
    """The folder and every file in it follow the umask (safetensors alone would leave the weights 0600)."""
    import os

    from llm_torch.quant.save import save_quantized

    out = save_quantized(tmp_path / "q", config_raw={"model_type": "llama"}, tensors={"w": torch.zeros(2, 2)},
                         quantization_config={"quant_method": "torchao"}, dtype=torch.float32, source_folder=None)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_missing_bitsandbytes_is_one_clear_error(monkeypatch):
    import sys

    from llm_torch.core.errors import UnsupportedError
    from llm_torch.quant import bnb_backend

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UnsupportedError, match="need the bitsandbytes package") as e:
        bnb_backend._bnb()
    assert "--int8" in e.value.hint


def test_loaded_line_names_a_saved_quantization():
    from llm_torch.cli.common import _saved_quantization

    assert _saved_quantization({}) == ""
    torchao = {"quantization_config": {"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}}
    assert _saved_quantization(torchao) == ", torchao Int8WeightOnlyConfig quantized"
    bnb = {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}
    assert _saved_quantization(bnb) == ", bitsandbytes nf4 quantized"
    assert _saved_quantization({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}) == ", bitsandbytes LLM.int8 quantized"
