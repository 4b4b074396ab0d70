"""Llama, Llama 2 and Llama-architecture kin (SmolLM2, TinyLlama, ...): the parent family, no flags set."""

from . import Family

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
    tokenizer_class="LlamaTokenizer",
    tokenizer_gguf_architectures=("llama",),
)
