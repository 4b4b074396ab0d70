"""Tiny random configs per family (HF field names) and helpers that build the reference model."""

from __future__ import annotations

import copy

import torch

LLAMA_BASE = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

GEMMA2_BASE = dict(
    model_type="gemma2",
    architectures=["Gemma2ForCausalLM"],
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=24,
    sliding_window=6,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)

LLAMA_VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim_bias": dict(head_dim=24, attention_bias=True, mlp_bias=True),
    "pretraining_tp": dict(pretraining_tp=2),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "rope_llama3": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "rope_yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
}

GEMMA2_VARIANTS = {
    "default_layers": {},
    "layer_types": dict(layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
    "no_softcap": dict(attn_logit_softcapping=None, final_logit_softcapping=None),
}


def config_dict(base: dict, variant: dict) -> dict:
    d = copy.deepcopy(base)
    d.update(copy.deepcopy(variant))
    return d


def hf_model(cfg: dict, seed: int = 0, std: float = 0.2):
    """The transformers reference model with weights large enough that soft-caps and windows matter."""
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    if cfg["model_type"] == "gemma2":
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1).add_(0 if cfg["model_type"] == "gemma2" else 1.0)
            else:
                p.normal_(0.0, std)
    return model.eval()


def write_tokenizer_files(folder, tokenizer, **config) -> None:
    """tokenizer.json + tokenizer_config.json (specials, chat template, extra `config` keys) of a real tokenizer."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer._backend.save(str(folder / "tokenizer.json"))
    settings = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token, "chat_template": tokenizer.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, **config}))


def save_with_tokenizer(folder, cfg: dict, tokenizer) -> None:
    """A complete HF folder: tiny random weights + a real tokenizer (vocab_size must match) + template."""
    hf_model(cfg).save_pretrained(folder)
    write_tokenizer_files(folder, tokenizer)
