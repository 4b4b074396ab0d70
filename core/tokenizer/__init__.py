"""Tokenizers for Llama / Llama 2 / Gemma 2 style checkpoints, chat templates and streaming detokenization.

Modules: tokenizer (the Tokenizer), hf_folder and gguf_vocab (its two sources), backends (the `tokenizers`
pipelines transformers builds), sentencepiece (a tokenizer.model read without sentencepiece), special_tokens,
chat_template, system_prompt, streaming. transformers is the reference every test compares against.
"""

from .backends import derive_merges
from .streaming import StreamingDetokenizer
from .tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer", "Tokenizer", "derive_merges"]
