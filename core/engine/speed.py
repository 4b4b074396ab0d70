"""Optional speed-ups applied after loading."""

from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile the single-token decode step; prefill (few calls, compute-bound) stays eager.

    The compiled graph traces the PyTorch layers, so the engine runs them instead of the native step
    (core.engine.runner reads `model.compiled`). Before that step existed it raised SmolLM2 decode (2 threads,
    fp16 weights) from 37 to 63 tokens/s on one machine after a 20-75 s first call; now it is slower (README).
    """
    model.compiled = True
    eager = model.forward
    compiled = torch.compile(eager, dynamic=True)

    def forward(input_ids, **kw):
        if input_ids.shape[1] == 1 and kw.get("attention_mask") is None and not kw.get("last_only"):
            return compiled(input_ids, **kw)
        return eager(input_ids, **kw)

    model.forward = forward
