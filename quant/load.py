"""Open a quantized folder: QuantizedLoader is the weight format (core/placement/weight_formats.py) of the
bitsandbytes and torchao quant_methods, declared as entry points in pyproject.toml; core/placement/loading.py
hands it the meta-device model and the checkpoint stream.

`quantization_config` (the Hub's schema) names the scheme; which layers are quantized is read from the
checkpoint's own keys (a pre-quantized Hub checkpoint may skip any layer), never re-quantized.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from llm_torch.core.errors import CheckpointError, UnsupportedError

from .spec import scheme_label
from .swap import replace_module, codec_for, linear_targets


def scheme_from_config(qconfig: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(runtime scheme, codec kwargs) of a config.json `quantization_config`."""
    if not isinstance(qconfig, dict):
        raise CheckpointError("quantization_config in config.json is not an object")
    method = qconfig.get("quant_method")
    if method == "bitsandbytes":
        if qconfig.get("load_in_4bit"):
            kind = qconfig.get("bnb_4bit_quant_type", "fp4")
            if kind not in ("nf4", "fp4"):
                raise UnsupportedError(f"bitsandbytes 4-bit type '{kind}' is not supported", hint="nf4 and fp4 are")
            return kind, {"double_quant": bool(qconfig.get("bnb_4bit_use_double_quant"))}
        if qconfig.get("load_in_8bit"):
            return "llm-int8", {}
        raise CheckpointError("bitsandbytes quantization_config has neither load_in_4bit nor load_in_8bit")
    if method == "torchao":
        from .int_layers import FORMAT, SCHEME_OF_TYPE

        quant_type = qconfig.get("quant_type")
        if qconfig.get("llm_torch_format") != FORMAT or not isinstance(quant_type, dict):
            raise UnsupportedError(
                "torchao checkpoints saved by transformers (tensor subclasses) cannot be loaded",
                hint="load the float model with --quantize int8|int4, or save a copy with llm quantize",
            )
        entry = quant_type.get("default", {})
        scheme = SCHEME_OF_TYPE.get(entry.get("_type"))
        if scheme is None:
            raise UnsupportedError(f"torchao config '{entry.get('_type')}' is not supported", hint="int8, int4 and int8-dynamic are")
        return scheme, {"group_size": int(entry.get("_data", {}).get("group_size", 128))}
    raise UnsupportedError(f"quantization method '{method}' is not supported", hint="bitsandbytes and torchao (saved by llm quantize) are")


class _Pending(nn.Module):
    """Stands in for a quantized layer until its tensors have been read."""


class QuantizedLoader:
    """Replace quantized Linears of a meta model by placeholders, take their tensors out of the stream,
    build the quantized modules at the end. core/placement/loading.assign_checkpoint: loader.filter(stream) ...
    loader.finish()."""

    def __init__(self, model: nn.Module, qconfig: dict[str, Any], tensor_names: Callable[[], set[str]],
                 dtype: torch.dtype, device: torch.device):
        # tensor_names(): every tensor name of the checkpoint (from the file headers), asked for once the
        # quantization_config is known to be one we read
        scheme, kwargs = scheme_from_config(qconfig)
        self.codec = codec_for(scheme, **kwargs)
        self.scheme, self.double_quant = scheme, bool(kwargs.get("double_quant"))
        self.group_sizes: set[int] = set()  # int4: read from the tensors' shapes as the layers are built
        self.model, self.device, self.dtype = model, device, dtype
        keys = tensor_names()
        marker = self.codec.marker
        self.targets = []
        for t in linear_targets(model):
            flags = [f"{n}.{marker}" in keys for n, _ in t.parts]
            if all(flags):
                self.targets.append(t)
                replace_module(model, t.name, _Pending())
            elif any(flags):
                raise CheckpointError(
                    f"'{t.name}' mixes quantized and float parts ({', '.join(n for n, _ in t.parts)})",
                    hint="fused projections must be quantized alike",
                )
        # --quantize-embeddings (torchao schemes): int8 tables; a tied head is rebuilt on the same table.
        self.embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and f"{n}.{marker}" in keys]
        self.tied_head = bool(self.embeddings) and getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head") \
            and not any(n == "lm_head" for t in self.targets for n, _ in t.parts)
        for name in self.embeddings:
            replace_module(model, name, _Pending())
        if self.tied_head:
            replace_module(model, "lm_head", _Pending())
            object.__setattr__(model.config, "tie_word_embeddings", False)  # nothing for assign_weights to tie
        if not self.targets and not self.embeddings:
            raise CheckpointError(f"quantization_config says {scheme}, but no layer in the checkpoint is quantized")
        if any(n == "lm_head" for t in self.targets for n, _ in t.parts):
            # A quantized head has its own tensors, even when the float model tied it.
            object.__setattr__(model.config, "tie_word_embeddings", False)
        self.prefixes = {n: t for t in self.targets for n, _ in t.parts} | dict.fromkeys(self.embeddings)
        self.stash: dict[str, torch.Tensor] = {}

    def _owner(self, key: str) -> str | None:
        # Checkpoint names are <module>.<tensor...>; bitsandbytes' tensor names hold dots themselves.
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.prefixes:
                return prefix
        return None

    def filter(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if self._owner(name) is None:
                yield name, tensor
            else:
                self.stash[name] = tensor

    def finish(self) -> None:
        for t in self.targets:
            parts = []
            for part_name, rows in t.parts:
                prefix = part_name + "."
                tensors = {k[len(prefix):]: self.stash.pop(k) for k in [k for k in self.stash if k.startswith(prefix)]}
                parts.append(tensors)
            biases = [p.pop("bias", None) for p in parts]
            if any(b is not None for b in biases) and any(b is None for b in biases):
                raise CheckpointError(f"'{t.name}': some parts have a bias and some do not")
            bias = torch.cat([b.to(self.dtype) for b in biases]) if biases[0] is not None else None
            module = self.codec.build(parts, bias, t.name)
            rows = sum(r for _, r in t.parts)
            if getattr(module, "out_features", rows) != rows or getattr(module, "in_features", t.in_features) != t.in_features:
                raise CheckpointError(
                    f"quantized '{t.name}' is {module.out_features}x{module.in_features}, the config expects {rows}x{t.in_features}"
                )
            replace_module(self.model, t.name, module.to(self.device))
            if getattr(module, "group_size", None):
                self.group_sizes.add(module.group_size)
        for name in self.embeddings:
            from .int_layers import Int8Embedding

            q, scale = self.stash.pop(f"{name}.weight", None), self.stash.pop(f"{name}.weight_scale")
            if q is None or q.dtype != torch.int8 or scale.shape != (q.shape[0],):
                raise CheckpointError(f"quantized embedding '{name}' is unusable (weight / weight_scale missing or mis-shaped)")
            emb = Int8Embedding(q, scale).to(self.device)
            replace_module(self.model, name, emb)
            if self.tied_head and name.endswith("embed_tokens"):
                self.model.lm_head = emb.tied_head()
        if self.stash:
            raise CheckpointError(f"unexpected quantized tensor(s): {', '.join(sorted(self.stash)[:6])}")

    @property
    def label(self) -> str:
        """The scheme as loaded (after finish): int4-g64-g128, int8, nf4-dq ..."""
        return scheme_label(self.scheme, group_sizes=self.group_sizes, double_quant=self.double_quant)
