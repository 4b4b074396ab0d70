"""Quantizing a model that lives on a CUDA GPU, through the backends made for it (the seeds' examples):
torchao's weight-only int4 / int8, dynamic int8 and float8 (`quantize_`, in place on our nn.Linear
subclasses, so the PyTorch layers run them unchanged), bitsandbytes' Linear4bit (nf4 / fp4) and
Linear8bitLt (LLM.int8). The same skip list and notes as the CPU path (quant.swap.plan); nothing is saved
from here (`llm quantize` writes CPU-format folders, which load on any device). Tests: tests/test_gpu.py.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_torch.core.errors import UnsupportedError

from .spec import QuantSpec
from .swap import QuantResult, applied_label, plan, replace_module


def quantize_on_cuda(model: nn.Module, spec: QuantSpec) -> QuantResult:
    todo, kept, notes = plan(model, spec)
    result = QuantResult(notes=notes, kept=[n for t in kept for n, _ in t.parts], label=applied_label(spec, todo))
    names = {t.name for t in todo}
    if spec.backend == "torchao":
        _torchao(model, spec, names)
    else:
        for name in names:
            replace_module(model, name, _bnb_layer(model.get_submodule(name), spec))
    result.quantized = [n for t in todo for n, _ in t.parts]
    return result


def _torchao(model: nn.Module, spec: QuantSpec, names: set[str]) -> None:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as e:
        raise UnsupportedError(f"the torchao schemes on CUDA need the torchao package ({e})",
                               hint="pip install torchao, or use --quantize nf4 (bitsandbytes)") from None
    config = {
        "int4": lambda: Int4WeightOnlyConfig(group_size=spec.group_size),
        "int8": Int8WeightOnlyConfig,
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
        "float8": Float8DynamicActivationFloat8WeightConfig,
    }[spec.scheme]()
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in names)


def _bnb_layer(linear: nn.Linear, spec: QuantSpec) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UnsupportedError(f"the bitsandbytes schemes need the bitsandbytes package ({e})",
                               hint="pip install bitsandbytes, or use --quantize int4 (torchao)") from None
    w, device = linear.weight.detach(), linear.weight.device
    bias = linear.bias is not None
    if spec.scheme == "llm-int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0)
        layer.weight = bnb.nn.Int8Params(w.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=w.dtype,
                                  compress_statistics=spec.double_quant, quant_type=spec.scheme)
        layer.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, quant_type=spec.scheme,
                                         compress_statistics=spec.double_quant)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes as the weights move to the GPU
