"""Llama, Llama 2 and Llama-architecture kin (SmolLM2, TinyLlama, ...): the parent family, no flags set."""

from __future__ import annotations

from typing import Any, Callable

from .base import Family, GGUFLayout


def _gguf_read(get: Callable[..., Any], names: set[str], config: dict[str, Any]) -> None:
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    config["hidden_act"] = "silu"
    # Biases are not announced in the metadata: the tensors tell.
    layers = range(config["num_hidden_layers"])
    for field, tensor in (("attention_bias", MODEL_TENSOR.ATTN_Q), ("mlp_bias", MODEL_TENSOR.FFN_UP)):
        config[field] = any(f"{TENSOR_NAMES[tensor].format(bid=i)}.bias" in names for i in layers)


def _gguf_write(w: Any, cfg: Any) -> None:
    from gguf import RopeScalingType

    from llm_torch.core.errors import UnsupportedError

    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rope = cfg.rope_parameters
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for hf_key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                            ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(hf_key) is not None:
                add(float(rope[hf_key]))
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise UnsupportedError(f"rope type '{kind}' has no GGUF equivalent", hint="llama.cpp has linear, yarn, llama3")


FAMILY = Family(
    model_type="llama",
    # transformers' LlamaConfig defaults (a config.json may omit any of these).
    defaults={
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    },
    flags={},
    heads={
        "LlamaForCausalLM": "causal_lm",
        "LlamaModel": "causal_lm",
        "LlamaForSequenceClassification": "sequence_classification",
        "LlamaForTokenClassification": "token_classification",
        "LlamaForQuestionAnswering": "question_answering",
    },
    causal_lm="LlamaForCausalLM",
    gguf=GGUFLayout(
        interleaved_qk=True,
        head_dim_from_rope=True,
        read_config=_gguf_read,
        write_config=_gguf_write,
    ),
    tokenizer_class="LlamaTokenizer",
    tokenizer_gguf_architectures=("llama",),
)
