"""Feature extraction: the decoder's final hidden state per input, pooled.

The vectors are transformers' `last_hidden_state` of LlamaModel / Gemma2Model (after the final norm, no
head), which is what `pipeline("feature-extraction")` returns per token (pooling "none"). "mean" averages
the input's tokens (padding never counts), "last" takes its last token (how decoder-only embedding models
pool); --normalize scales each vector to unit L2 norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llm_torch.core.errors import InputError
from .inputs import Item

if TYPE_CHECKING:  # torch where vectors are made: check_pooling runs before the model (and torch) loads
    import torch

    from .base import PipelineBase

POOLINGS = ("mean", "last", "none")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling '{pooling}'", hint=f"poolings: {', '.join(POOLINGS)}")


def pool(hidden: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """One input's hidden states [n, C] (real tokens only) -> [C] ("mean", "last") or [n, C] ("none")."""
    import torch

    h = hidden.float()  # pool and normalize in fp32 whatever the activation dtype
    if pooling == "mean":
        h = h.mean(0)
    elif pooling == "last":
        h = h[-1]
    if normalize:
        # F.normalize's eps keeps an all-zero vector at zero instead of NaN.
        h = torch.nn.functional.normalize(h, p=2.0, dim=-1)
    return h


def features(pipeline: PipelineBase, batch: list[Item], first_index: int) -> Iterator[dict[str, Any]]:
    """One result per input: index (input order), id (when the record has one) or text, tokens, embedding."""
    opts = pipeline.options
    rows = [pipeline.fit(pipeline.tokenizer.encode(it.text, add_special_tokens=True), it) for it in batch]
    for row, item in zip(rows, batch, strict=True):
        if not row:
            raise InputError(f"{item.where or 'input'}: no tokens to embed", hint="the text is empty after tokenizing")
    hidden = pipeline.forward_rows(rows)  # left-padded: row b's tokens are its last len(rows[b]) positions
    T = hidden.shape[1]
    for b, (item, row) in enumerate(zip(batch, rows, strict=True)):
        vector = pool(hidden[b, T - len(row) :], opts.pooling, opts.normalize).cpu()
        out: dict[str, Any] = {"index": first_index + b}
        if item.id is not None:
            out["id"] = item.id
        else:
            out["text"] = item.text
        out["tokens"] = len(row)
        out["embedding"] = vector.tolist()
        yield out
