"""Tokenizers for Llama / Llama 2 / Gemma 2 style checkpoints, chat templates and streaming detokenization.

Modules: tokenizer (the Tokenizer), hf_folder and gguf_vocab (its two sources), pipelines (the `tokenizers`
pipelines transformers builds), special_tokens, chat_template, streaming. transformers is the reference
every test compares against.
"""

from .backends import derive_merges
from .streaming import StreamingDetokenizer
from .tokenizer import Tokenizer

__all__ = ["StreamingDetokenizer", "Tokenizer", "derive_merges"]
