"""Optional speed-ups applied after loading."""

from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile the forward; dynamic shapes so each new cache length does not recompile."""
    model.forward = torch.compile(model.forward, dynamic=True)
