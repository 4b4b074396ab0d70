"""Optional speed-ups applied after loading."""

from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile the forward; dynamic shapes so each new cache length does not recompile."""
    model.forward = torch.compile(model.forward, dynamic=True)


def fuse_projections(model: torch.nn.Module) -> None:
    """Fuse q/k/v and gate/up projections in place (after loading; checkpoint names no longer apply)."""
    for module in model.modules():
        if hasattr(module, "fuse"):
            module.fuse()
