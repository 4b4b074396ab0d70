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
    cpu = kv_layer_bytes(config, 300, torch.float32, "cpu")  # an fp32 model keeps fp32 keys on a CPU
    assert sum(cpu) == KVCache.bytes_for(config, 1, 300, RING_MARGIN, "f32")
    assert kv_layer_bytes(config, 300, torch.bfloat16, "cuda:1") == [n // 2 for n in cpu]
    cache = KVCache(config, 1, 300, ring_margin=RING_MARGIN, device="meta")
    assert cpu == [2 * k.numel() * 4 for k in cache.keys] and sum(cpu) == cache.nbytes


@pytest.mark.parametrize("dtype,kv,quantized,per_value", [
    (torch.float32, "auto", False, 4), (torch.bfloat16, "auto", False, 2), (torch.float16, "auto", False, 2),
    (torch.float32, "auto", True, 2), (torch.float32, "bf16", False, 2), (torch.float16, "f32", False, 4),
    (torch.float32, "int8", False, 34 / 32)])
def test_kv_bytes_by_format(dtype, kv, quantized, per_value):
    """On a CPU: 16-bit and quantized models store f16 keys (auto), fp32 ones f32; int8 adds an f16 scale per 32
    values. The plan's count is what a cache in that format allocates."""
    from llm_torch.core.placement.sizing import kv_format

    config = ModelConfig.from_dict(config_dict(GEMMA2_BASE, dict(head_dim=32)))
    got = kv_layer_bytes(config, 300, dtype, "cpu", kv_cache=kv, quantized=quantized)
    f32 = kv_layer_bytes(config, 300, torch.float32, "cpu")
    assert [g * 4 for g in got] == [n * per_value for n in f32]
    cache = KVCache(config, 1, 300, ring_margin=RING_MARGIN, device="meta",
                    kv_format=kv_format(dtype, "cpu", kv, quantized))
    assert sum(got) == cache.nbytes


def test_unknown_kv_format_is_refused():
    from llm_torch.core.errors import InputError
    from llm_torch.core.placement.sizing import kv_format

    with pytest.raises(InputError, match="unknown KV cache format 'q4'"):
        kv_format(torch.float32, "cpu", "q4")
    with pytest.raises(InputError, match="multiple of 32"):  # int8's blocks of 32 along head_dim
        KVCache(ModelConfig.from_dict(GEMMA2_BASE), 1, 8, kv_format="int8", device="meta")
