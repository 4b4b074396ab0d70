"""What every task step runs on (classify.py, qa.py, embed.py): the PipelineOptions, and PipelineBase, one
loaded model with its tokenizer that cuts inputs to the context and runs left-padded batches through the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llm_torch.core.errors import InputError
from llm_torch.core.engine.spec import GenerationSpec, context_length
from .inputs import Item, Warn, no_warn


@dataclass
class PipelineOptions:
    batch_size: int = 1
    truncate: str = "warn"  # warn: cut to the context with a warning; error: refuse
    top_k: int = 1  # text-classification: labels per input
    aggregation: str = "none"  # token-classification: none | simple
    ignore_labels: tuple[str, ...] = ("O",)
    # question-answering, as the pipeline's parameters of the same names (qa.py)
    max_answer_len: int = 15  # longest answer in tokens
    max_seq_len: int | None = None  # tokens per window (question + context part); None: min(context, 384)
    doc_stride: int | None = None  # tokens shared by consecutive windows; None: min(max_seq_len // 2, 128)
    handle_impossible_answer: bool = False  # the empty answer competes, with the score of position 0
    pooling: str = "mean"  # feature-extraction: mean | last | none (embed.py)
    normalize: bool = False  # feature-extraction: L2-normalize each vector
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    encode_prompt: Callable[[str], list[int]] | None = None  # text-generation (chat template or raw)
    return_full_text: bool = True  # text-generation: generated_text starts with the input (the pipeline's default)
    context: int | None = None  # positions per input (prompt + answer); None: the model's context


class PipelineBase:
    """One loaded model and its tokenizer, with the options and the warning callback of a pipeline."""

    def __init__(self, model, tokenizer, options: PipelineOptions | None = None, *, warn: Warn = no_warn):
        if tokenizer is None:
            raise InputError("the pipelines need a tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.options = options or PipelineOptions()
        self.warn = warn
        self.device = next(model.parameters()).device

    def fit(self, ids: list[int], item: Item) -> list[int]:
        """`ids` cut to the context (--context, else the model's; with a warning), or an InputError with --truncate error."""
        limit = min(self.options.context or context_length(self.model), context_length(self.model))
        if len(ids) <= limit:
            return ids
        if self.options.truncate == "error":
            raise InputError(
                f"{item.where or 'input'}: {len(ids)} tokens, longer than the context ({limit})",
                hint="shorten it, or drop --truncate error to cut it with a warning",
            )
        self.warn(f"{item.where or 'input'}: truncated from {len(ids)} to {limit} tokens (the context)")
        return ids[:limit]

    def forward_rows(self, rows: Sequence[list[int]]):
        """Left-padded batch -> the head's output; rows are right-aligned so position -1 is real."""
        pad = self.model.config.pad_token_id
        pad = 0 if pad is None else pad
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, longest - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, longest - len(r) :] = 1
        # A full mask means no padding: None keeps attention on its fast path.
        attention = None if bool(mask.all()) else mask.to(self.device)
        with torch.inference_mode():
            return self.model(ids.to(self.device), attention_mask=attention)
