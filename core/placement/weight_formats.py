"""Weight formats: who turns the stored tensors of a quantized checkpoint into modules, by the
`quant_method` of its quantization_config. core names no format and never imports one: a package
declares its loaders as entry points of the group below (name: the quant_method, value: the loader),
read the first time a checkpoint of that method is met, so every way in (the CLI, the server, a
script calling load_model) finds them. llm-torch's own (quant/load.py) are declared in pyproject.toml;
register_weight_format adds one at run time.

A loader is called as loader(model, quantization_config, tensor_names, dtype, device) on the meta-device
model before any weight is assigned; tensor_names() lists the checkpoint's tensors (file headers).
loading.assign_checkpoint passes the tensor stream through its `filter` and calls `finish` at the end.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from llm_torch.core.errors import CheckpointError, UnsupportedError

ENTRY_POINTS = "llm_torch.weight_formats"


class WeightFormat(Protocol):
    def filter(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Take this format's tensors out of the stream; the rest go on to loading.assign_weights."""

    def finish(self) -> None:
        """Build this format's modules from the tensors taken, once the stream has been read."""


WeightFormatLoader = Callable[[nn.Module, dict[str, Any], Callable[[], set[str]], torch.dtype, torch.device],
                              WeightFormat]

_LOADERS: dict[str, WeightFormatLoader] = {}


def register_weight_format(quant_method: str, loader: WeightFormatLoader) -> None:
    """Load checkpoints whose quantization_config says `quant_method` with `loader` (module doc)."""
    _LOADERS[quant_method] = loader


def weight_format_for(quantization_config: dict[str, Any]) -> WeightFormatLoader:
    """The loader registered for a quantization_config's quant_method; UnsupportedError when none is."""
    if not isinstance(quantization_config, dict):
        raise CheckpointError("quantization_config in config.json is not an object")
    method = quantization_config.get("quant_method")
    if method not in _LOADERS:
        for entry in entry_points(group=ENTRY_POINTS, name=str(method)):
            _LOADERS[method] = entry.load()
            break
    if method in _LOADERS:
        return _LOADERS[method]
    known = sorted(set(_LOADERS) | {entry.name for entry in entry_points(group=ENTRY_POINTS)})
    if not known:
        raise UnsupportedError(
            f"quantization method '{method}' is not supported: no weight format is registered",
            hint=f"reinstall llm-torch (pip install -e . in a checkout): its package metadata declares its "
                 f"quantized formats ('{ENTRY_POINTS}' entry points)")
    raise UnsupportedError(f"quantization method '{method}' is not supported", hint=f"supported: {', '.join(known)}")
