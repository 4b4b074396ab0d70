"""Sizes in one place (core/placement/sizing.py): parameters as every head's module tree holds them, KV bytes
by the cache's own formula with the engine's ring margin."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.engine.engine import EngineConfig
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.model import HEADS
from llm_torch.core.placement.sizing import RING_MARGIN, kv_layer_bytes, param_counts
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, LLAMA_VARIANTS, config_dict


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("base", [config_dict(LLAMA_BASE, LLAMA_VARIANTS["head_dim_bias"]),
                                  config_dict(LLAMA_BASE, LLAMA_VARIANTS["tied"]), GEMMA2_BASE],
                         ids=["llama-bias", "llama-tied", "gemma2"])
def test_parameters_are_those_the_built_model_holds(base, head):
    config = ModelConfig.from_dict(base)
    with torch.device("meta"):
        model = HEADS[head](config)
    counts = param_counts(config, head)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert len(counts.layers) == config.num_hidden_layers and counts.embed == config.vocab_size * config.hidden_size


def test_kv_bytes_follow_the_cache_and_the_engines_ring():
    config = ModelConfig.from_dict(GEMMA2_BASE)
    assert RING_MARGIN == EngineConfig().prefill_chunk
    cpu = kv_layer_bytes(config, 300, torch.bfloat16, "cpu")  # fp32 activations on a CPU
    assert sum(cpu) == KVCache.bytes_for(config, 1, 300, RING_MARGIN, 4)
    assert kv_layer_bytes(config, 300, torch.bfloat16, "cuda:1") == [n // 2 for n in cpu]
    cache = KVCache(config, 1, 300, ring_margin=RING_MARGIN, device="meta")
    assert cpu == [2 * k.numel() * 4 for k in cache.keys]
