"""Published configs build on the meta device with transformers' parameter counts and key names."""

import pytest
import torch

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.placement.loading import build_model

LLAMA2 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
GEMMA2 = dict(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    vocab_size=256000,
    head_dim=256,
    max_position_embeddings=8192,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
# (config overrides, parameter count published for the checkpoint; None where we only compare with transformers)
CONFIGS = {
    "Llama-2-7b": ({**LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}, 6_738_415_616),
    "Llama-2-13b": ({**LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40}, 13_015_864_320),
    "Llama-2-70b": ({**LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}, 68_976_648_192),
    "gemma-2-2b": ({**GEMMA2, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "query_pre_attn_scalar": 256}, 2_614_341_888),
    "gemma-2-9b": ({**GEMMA2, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "query_pre_attn_scalar": 256}, 9_241_705_984),
    "gemma-2-27b": ({**GEMMA2, "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46, "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 144}, 27_227_128_320),
}


def reference_meta_model(cfg):
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_config_builds_like_the_reference(name):
    cfg, published = CONFIGS[name]
    ours = build_model(ModelConfig.from_dict(cfg))
    ref = reference_meta_model(cfg)
    assert all(p.device.type == "meta" for p in ours.parameters())
    assert count(ours) == count(ref)
    if published is not None:
        assert count(ours) == published
    assert sorted(ours.state_dict().keys()) == sorted(ref.state_dict().keys())
