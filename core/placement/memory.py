"""Will a model fit? Weights and KV cache estimated from the config alone (core/placement/sizing.py: nothing read
or allocated), against the memory the device has free, so a model that cannot fit is refused before minutes of loading."""

from __future__ import annotations

import torch

from llm_torch.core.model.config import ModelConfig, resolve_context
from llm_torch.core.errors import ResourceError

from .sizing import kv_format, kv_layer_bytes, param_counts, weight_bytes

GIB = 2**30


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new model on `device` (None: this platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device.index or 0)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def estimate(config: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, slots: int = 1,
             head: str = "causal_lm", kv_cache: str = "auto", quantized: bool = False) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) the model `config` describes needs for `slots` sequences of `context`
    tokens, as the engine's cache holds them (--kv-cache `kv_cache`). A tensor-parallel rank passes its shard's config."""
    return (weight_bytes(param_counts(config, head).total, dtype),
            sum(kv_layer_bytes(config, context, dtype, device, slots, kv_cache, quantized)))


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, *, context: int | None = None,
               head: str = "causal_lm", weights: int | None = None, kv_cache: str = "auto") -> None:
    """ResourceError when the weights plus one full-context sequence's KV cache exceed the free memory.
    weights: their bytes where they are not all `dtype` (packed GGUF blocks); None: counted from the config."""
    context = resolve_context(config, context)  # InputError past what the rope setup supports
    free = available_bytes(device)
    if free is None:
        return
    counted, kv = estimate(config, dtype, device, context, head=head, kv_cache=kv_cache)
    weights = counted if weights is None else weights
    if weights + kv > free:
        raise ResourceError(
            f"the model needs ~{weights / GIB:.1f} GiB of {str(dtype).removeprefix('torch.')} weights + "
            f"{kv / GIB:.1f} GiB of KV cache for {context} tokens on {device}, which has {free / GIB:.1f} GiB free",
            hint="use a quantized model (llm quantize), --dtype bfloat16, a shorter --context, or --tp")


def plan_line(config: ModelConfig, dtype: torch.dtype, device: torch.device, context: int,
              head: str = "causal_lm", kv_cache: str = "auto", quantized: bool = False,
              weights: int | None = None) -> str:
    """The dry run's line for one device: what the model would take there (the KV cache in its format), and
    what is free (weights: as check_fits, the bytes of GGUF blocks kept packed)."""
    counted, kv = estimate(config, dtype, device, context, head=head, kv_cache=kv_cache, quantized=quantized)
    packed = " (GGUF blocks kept packed)" if weights is not None else ""
    weights = counted if weights is None else weights
    free = available_bytes(device)
    fmt = kv_format(dtype, device, kv_cache, quantized)
    return (f"{device}: {weights / GIB:.2f} GiB weights{packed} + {kv / GIB:.2f} GiB {fmt} KV for {context} tokens"
            + (f", {free / GIB:.2f} GiB free" if free is not None else ""))
