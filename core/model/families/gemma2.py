"""Gemma 2: scaled embeddings, (1 + w) RMSNorm, GELU-tanh MLP, sandwich norms, soft-capping, sliding windows."""

from __future__ import annotations

from typing import Any, Callable

from .base import Family, GGUFLayout

# llama.cpp's defaults when a Gemma 2 file omits these keys (llama-hparams.h / HF Gemma2Config agree):
# HF field -> (GGUF key under "gemma2.", default).
GGUF_DEFAULTS = {
    "attn_logit_softcapping": ("attn_logit_softcapping", 50.0),
    "final_logit_softcapping": ("final_logit_softcapping", 30.0),
    "sliding_window": ("attention.sliding_window", 4096),
}


def default_layer_types(n_layers: int) -> list[str]:
    """The reference's default: even layers (0, 2, ...) slide, odd layers attend globally (llama.cpp's too)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]


def gguf_query_pre_attn_scalar(hidden: int, heads: int, layers: int, head_dim: int) -> int:
    """llama.cpp scales queries by 1/sqrt(n_embd / n_head) for the 46-layer 27B and by 1/sqrt(head_dim)
    otherwise (llama_model::load_hparams, after gemma_pytorch's config): GGUF cannot say anything else."""
    return hidden // heads if layers == 46 else head_dim


def _normalize(c: dict[str, Any]) -> dict[str, Any]:
    c = dict(c)
    # Gemma 2 reads `hidden_activation`; published configs carry both spellings.
    c["hidden_act"] = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if not c.get("layer_types"):
        c["layer_types"] = default_layer_types(int(c["num_hidden_layers"]))
    return c


def _gguf_read(get: Callable[..., Any], names: set[str], config: dict[str, Any]) -> None:
    config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"
    for key, (gguf_key, default) in GGUF_DEFAULTS.items():
        value = get(gguf_key, default)
        config[key] = int(value) if key == "sliding_window" else value
    config["query_pre_attn_scalar"] = gguf_query_pre_attn_scalar(
        config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"], config["head_dim"])


def _gguf_write(w: Any, cfg: Any) -> None:
    from llm_torch.core.errors import UnsupportedError

    # What the reader (and llama.cpp) will assume must be what this model does.
    expected = gguf_query_pre_attn_scalar(cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.head_dim)
    if cfg.query_pre_attn_scalar != expected or list(cfg.layer_types) != default_layer_types(cfg.num_hidden_layers):
        raise UnsupportedError("this Gemma 2 config (query_pre_attn_scalar / layer_types) cannot be expressed in GGUF",
                               hint="llama.cpp fixes both from the layer count")
    if cfg.attn_logit_softcapping is None or cfg.final_logit_softcapping is None:
        raise UnsupportedError("Gemma 2 without soft-capping cannot be expressed in GGUF")
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_sliding_window(int(cfg.sliding_window))


FAMILY = Family(
    model_type="gemma2",
    # transformers' Gemma2Config defaults.
    defaults={
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    flags={"embed_scale": True, "norm_unit_offset": True, "sandwich_norms": True, "query_pre_attn_scalar": True},
    heads={
        "Gemma2ForCausalLM": "causal_lm",
        "Gemma2Model": "causal_lm",
        "Gemma2ForSequenceClassification": "sequence_classification",
        "Gemma2ForTokenClassification": "token_classification",
    },
    normalize=_normalize,
    causal_lm="Gemma2ForCausalLM",
    gguf=GGUFLayout(
        read_config=_gguf_read,
        write_config=_gguf_write,
        spaces_in_pieces=True,
    ),
    # transformers builds every Gemma generation's sentencepiece GGUF vocabulary as GemmaTokenizer.
    tokenizer_class="GemmaTokenizer",
    tokenizer_gguf_architectures=("gemma", "gemma2", "gemma3"),
)
