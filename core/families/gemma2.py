"""Gemma 2: scaled embeddings, (1 + w) RMSNorm, GELU-tanh MLP, sandwich norms, soft-capping, sliding windows."""

from typing import Any

from . import Family


def _normalize(c: dict[str, Any]) -> dict[str, Any]:
    c = dict(c)
    # Gemma 2 reads `hidden_activation`; published configs carry both spellings.
    c["hidden_act"] = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if not c.get("layer_types"):
        # The reference's default: even layers (0, 2, ...) slide, odd layers attend globally.
        c["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(int(c["num_hidden_layers"]))
        ]
    return c


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
    # transformers builds every Gemma generation's sentencepiece GGUF vocabulary as GemmaTokenizer.
    tokenizer_class="GemmaTokenizer",
    tokenizer_gguf_architectures=("gemma", "gemma2", "gemma3"),
)
