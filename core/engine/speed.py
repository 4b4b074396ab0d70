"""--compile: torch.compile installed as the runner of a model, never written into the model."""

from __future__ import annotations

import torch

from llm_torch.core.model.model import CausalLM

from .runner import TorchRunner, install


def compile_model(model: CausalLM) -> None:
    """Run the model's one-token decode steps through torch.compile; prefill (few calls, compute-bound) stays eager.

    Installs a TorchRunner whose decode is the compiled graph of the PyTorch layers, so the engine runs them
    instead of the native step. One compiled function serves every engine over this model (one compile cache);
    nothing is compiled before the first step. Before the native step existed it raised SmolLM2 decode
    (2 threads, fp16 weights) from 37 to 63 tokens/s on one machine after a 20-75 s first call; now it is
    slower (README).
    """
    decode = torch.compile(model.forward, dynamic=True)
    install(model, lambda m: TorchRunner(m, "torch.compile (--compile)", decode=decode))
