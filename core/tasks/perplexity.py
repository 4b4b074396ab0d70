"""Perplexity of texts under a causal LM, by transformers' documented recipe ("Perplexity of fixed-length
models"): the tokens go through windows of at most `context` tokens that advance by `stride`; each window
scores only the tokens the previous window did not (the others are context), so with stride < context
every token after the first is scored once, with at least `context - stride` tokens before it (side by
side windows cannot score their first token). Perplexity = exp(mean negative log-likelihood) over the
scored tokens; per document and over all of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from llm_torch.core.model.config import resolve_context
from llm_torch.core.errors import InputError


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class Score:
    name: str
    tokens: int  # tokens of the document (BOS included)
    scored: int  # tokens predicted (all but the first)
    nll: float  # summed negative log-likelihood of the scored tokens (nats)
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.scored) if self.scored else float("nan")

    def to_dict(self) -> dict:
        return {"name": self.name, "tokens": self.tokens, "scored_tokens": self.scored,
                "nll": round(self.nll, 6), "perplexity": round(self.perplexity, 6),
                "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds > 0 else None}


# Tokens per forward inside a window: progress comes every chunk, and the logits held are [CHUNK, V] instead
# of [context, V] (1.6 GB for SmolLM2's 8192 x 49152 in fp32). Through the KV cache the chunks compute what
# one forward over the window does.
CHUNK = 512


@torch.inference_mode()
def window_nll(model, ids: list[int], context: int, stride: int,
               progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(summed NLL, tokens scored) of one token sequence, transformers' sliding-window recipe.

    progress(tokens): after each chunk, how far through `ids` the scoring is (ids[:tokens] done)."""
    if context < 2:
        raise InputError(f"the window must hold at least 2 tokens, got {context}")
    if not 0 < stride <= context:
        raise InputError(f"the stride must be in [1, {context}] (the window), got {stride}")
    device = next(model.parameters()).device
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        new = end - prev_end  # tokens this window scores (the earlier ones are context only)
        window = torch.tensor([ids[begin:end]], device=device)
        T = window.shape[1]
        # Position t predicts token t + 1: score the targets among the last `new` tokens, never the first token.
        first = max(T - new, 1)
        cache = model.new_cache(1, T) if T > CHUNK else None
        for c0 in range(0, T, CHUNK):
            c1 = min(c0 + CHUNK, T)
            # rope_lengths: dynamic NTK rope scales for the whole window, as in one forward over it.
            logits = model(window[:, c0:c1], cache=cache, rope_lengths=[T])[0].float()  # row i predicts c0 + i + 1
            lo, hi = max(first, c0 + 1), min(c1 + 1, T)  # the targets this chunk predicts
            if hi > lo:
                total += F.cross_entropy(logits[lo - 1 - c0 : hi - 1 - c0], window[0, lo:hi], reduction="sum").item()
                scored += hi - lo
            if progress is not None:
                progress(prev_end + new * c1 // T)
        prev_end = end
        if end == len(ids):
            break
    return total, scored


def score(model, tokenizer, documents: Iterable[Document], *, context: int | None = None, stride: int | None = None,
          add_bos: bool = True, progress: Callable[[int, int], None] | None = None) -> Iterator[Score]:
    """One Score per document, in order (lazily: a reader that stops early stops the work).

    progress(done, total): tokens the windows have covered, over all the documents, after each window."""
    # A window past what the rope setup supports (config.supported_context) is an InputError.
    context = resolve_context(model.config, context, "the window")
    stride = stride or context // 2
    # Tokenized up front (cheap next to the model) so that progress knows the total.
    encoded = [(doc, tokenizer.encode(doc.text, add_special_tokens=add_bos)) for doc in documents]
    total, before = sum(len(ids) for _, ids in encoded), 0
    if progress is not None:
        progress(0, total)
    for doc, ids in encoded:
        if len(ids) < 2:
            raise InputError(f"{doc.name}: fewer than 2 tokens, nothing to score")
        report = None if progress is None else (lambda done, base=before: progress(base + done, total))
        t0 = time.perf_counter()
        nll, scored = window_nll(model, ids, context, stride, report)
        before += len(ids)
        yield Score(doc.name, len(ids), scored, nll, time.perf_counter() - t0)


def total(scores: list[Score]) -> dict:
    nll, scored, tokens = sum(s.nll for s in scores), sum(s.scored for s in scores), sum(s.tokens for s in scores)
    seconds = sum(s.seconds for s in scores)
    return {"documents": len(scores), "tokens": tokens, "scored_tokens": scored, "nll": round(nll, 6),
            "perplexity": round(math.exp(nll / scored), 6) if scored else None,
            "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None}
