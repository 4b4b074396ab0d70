"""Will a model fit? Weights and KV cache estimated from the config alone (nothing read or allocated),
against the memory the device has free, so a model that cannot fit is refused before minutes of loading."""

from __future__ import annotations

import torch

from llm_torch.core.model.config import ModelConfig, resolve_context
from llm_torch.core.errors import ResourceError
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import compute_dtype


def param_count(config: ModelConfig) -> int:
    """Parameters of the causal LM the config describes (biases included, a tied head counted once)."""
    C, I, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attn = C * (q + 2 * kv) + q * C + ((q + 2 * kv + C) if config.attention_bias else 0)
    mlp = 3 * C * I + ((2 * I + C) if config.mlp_bias else 0)
    norms = (4 if config.sandwich_norms else 2) * C
    return V * C * (1 if config.tie_word_embeddings else 2) + L * (attn + mlp + norms) + C


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


# The engine's sliding-window rings hold window + its prefill chunk (EngineConfig.prefill_chunk's default).
ENGINE_RING_MARGIN = 256


def estimate(config: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, slots: int = 1,
             ranks: int = 1) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) one rank needs for `slots` sequences of `context` tokens, as the
    engine's cache holds them (sliding layers keep window + ENGINE_RING_MARGIN positions)."""
    weights = param_count(config) * torch.finfo(dtype).bits // 8 // ranks
    kv = KVCache.bytes_for(config, slots, context, ENGINE_RING_MARGIN,
                           torch.finfo(compute_dtype(dtype, device)).bits // 8) // ranks
    return weights, kv


def check_fits(config: ModelConfig, dtype: torch.dtype, device: torch.device, *, context: int | None = None,
               ranks: int = 1) -> None:
    """ResourceError when the weights plus one full-context sequence's KV cache exceed the free memory."""
    context = resolve_context(config, context)  # InputError past what the rope setup supports
    free = available_bytes(device)
    if free is None:
        return
    weights, kv = estimate(config, dtype, device, context, ranks=ranks)
    if weights + kv > free:
        gib = 2**30
        raise ResourceError(
            f"the model needs ~{weights / gib:.1f} GiB of {str(dtype).removeprefix('torch.')} weights + "
            f"{kv / gib:.1f} GiB of KV cache for {context} tokens on {device}, which has {free / gib:.1f} GiB free",
            hint="use a quantized model (llm quantize), --dtype bfloat16, a shorter --context, or --tp")
