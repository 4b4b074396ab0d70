"""Extractive question answering as transformers' question-answering pipeline does it (its last version, 4.57).

The question and context are encoded as a tokenizer pair (the post-processor's pair template: `<s> q <s> c`
for Llama). A context longer than `max_seq_len` is split into windows overlapping by `doc_stride` tokens (the
tokenizer's own overflow, as the pipeline asks for it); each window is scored alone and the best spans of
all windows compete, equal answers adding their scores. Order and masking follow the tokenizer's padding
side, as in the pipeline: "right" puts the question first and only context tokens can answer; "left" (Llama
and Gemma tokenizers) puts the context first and masks nothing but position 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llm_torch.core.errors import InputError
from llm_torch.core.engine.spec import context_length
from .base import PipelineBase
from .inputs import Item

_MASKED = -10000.0  # the pipeline's logit for tokens that cannot be in an answer


def windows(tokenizer, question: str, context: str, max_seq_len: int, doc_stride: int, question_first: bool, where: str):
    """The `tokenizers.Encoding` of each window: the pair truncated to max_seq_len, then its overflow."""
    backend = tokenizer.backend
    previous = backend.truncation
    first, second = (question, context) if question_first else (context, question)
    context_sequence = 1 if question_first else 0
    try:
        backend.no_truncation()
        whole = backend.encode(first, second, add_special_tokens=True)
        if len(whole.ids) > max_seq_len:
            # tokenizers panics (a BaseException, with a Rust backtrace) unless the stride is below the
            # context tokens a window holds: say so in the user's terms instead.
            room = max_seq_len - sum(s != context_sequence for s in whole.sequence_ids)
            if doc_stride >= room:
                raise InputError(
                    f"{where}: windows of {max_seq_len} tokens hold {max(room, 0)} of the context after the question "
                    f"and special tokens: --doc-stride {doc_stride} must be smaller",
                    hint="raise --max-seq-len, lower --doc-stride, or shorten the question")
        backend.enable_truncation(max_seq_len, stride=doc_stride, strategy="only_second" if question_first else "only_first")
        encoding = backend.encode(first, second, add_special_tokens=True)
    finally:
        if previous is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**previous)
    return [encoding, *encoding.overflowing]


def spans(start: torch.Tensor, end: torch.Tensor, allowed: torch.Tensor, k: int, max_answer_len: int):
    """One window's logits [n] -> (starts, ends, scores) of its k best spans, and its null score.

    The pipeline's select_starts_ends + decode_spans: softmax over the allowed tokens, position 0 dropped
    (its start x end product is the null answer's score), spans with start <= end < start + max_answer_len.
    """
    start = torch.where(allowed, start.float(), _MASKED).softmax(-1)
    end = torch.where(allowed, end.float(), _MASKED).softmax(-1)
    null = float(start[0] * end[0])
    start[0] = end[0] = 0.0
    candidates = torch.triu(start[:, None] * end[None, :]).tril(max_answer_len - 1)
    flat = candidates.flatten()
    scores, idx = flat.topk(min(k, flat.numel()))
    starts, ends = idx // candidates.shape[1], idx % candidates.shape[1]
    # The pipeline keeps spans whose ends are among nonzero() of the [1, n] mask: the allowed positions,
    # and 0 (its row indices).
    ok = allowed.clone()
    ok[0] = True
    keep = ok[starts] & ok[ends]
    return starts[keep].tolist(), ends[keep].tolist(), scores[keep].tolist(), null


def char_span(encoding, s: int, e: int, sequence: int) -> tuple[int, int]:
    """Token span -> character span in the context, widened to whole words (the pipeline's align_to_words)."""
    try:
        start = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=sequence)[0]
        stop = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=sequence)[1]
    except Exception:  # a special token has no word (None); the pipeline falls back to token offsets then
        start, stop = encoding.offsets[s][0], encoding.offsets[e][1]
    return start, stop


def answer(pipeline: PipelineBase, item: Item) -> dict[str, Any]:
    opts, tokenizer = pipeline.options, pipeline.tokenizer
    where = item.where or "input"
    if not item.question:
        raise InputError(f"{where}: no question",
                         hint="pass --question, or give JSON input with 'question' and 'context' fields")
    limit = context_length(pipeline.model)
    max_seq_len = opts.max_seq_len or min(limit, 384)
    if max_seq_len > limit:
        raise InputError(f"--max-seq-len {max_seq_len} is longer than the model's context ({limit})")
    doc_stride = opts.doc_stride if opts.doc_stride is not None else min(max_seq_len // 2, 128)
    if doc_stride > max_seq_len:
        raise InputError(f"--doc-stride ({doc_stride}) is larger than --max-seq-len ({max_seq_len})")
    if opts.max_answer_len < 1:
        raise InputError(f"--max-answer-len must be >= 1, got {opts.max_answer_len}")
    question_first = tokenizer.padding_side == "right"
    encodings = windows(tokenizer, item.question, item.text, max_seq_len, doc_stride, question_first, where)
    top_k = max(opts.top_k, 1)
    found: list[dict[str, Any]] = []
    null = 1e6
    for lo in range(0, len(encodings), opts.batch_size):
        chunk = encodings[lo : lo + opts.batch_size]
        start_logits, end_logits = pipeline.forward_rows([list(enc.ids) for enc in chunk])
        T = start_logits.shape[1]
        for b, enc in enumerate(chunk):
            n = len(enc.ids)
            # question first: only the context (sequence 1) can answer; context first: every token can.
            allowed = torch.tensor([s == 1 for s in enc.sequence_ids] if question_first else [True] * n)
            starts, ends, scores, window_null = spans(start_logits[b, T - n :].cpu(), end_logits[b, T - n :].cpu(),
                                                      allowed, top_k * 2 + 10, opts.max_answer_len)
            null = min(null, window_null)
            # The pipeline shifts by the pad ids in a left-padding tokenizer's (unpadded) window.
            pad = tokenizer.pad_token_id
            shift = sum(i == pad for i in enc.ids) if not question_first and pad is not None else 0
            for s, e, score in zip(starts, ends, scores, strict=True):
                a, z = char_span(enc, s - shift, e - shift, 1 if question_first else 0)
                text = item.text[a:z]
                same = next((f for f in found if f["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += score
                else:
                    found.append({"answer": text, "score": score, "start": a, "end": z})
    if opts.handle_impossible_answer:
        found.append({"answer": "", "score": null, "start": 0, "end": 0})
    found = sorted(found, key=lambda f: f["score"], reverse=True)[:top_k]
    # No span at all (a context of special tokens only): the empty answer, as with handle_impossible_answer.
    best = found[0] if found else {"answer": "", "score": 0.0, "start": 0, "end": 0}
    out = {"question": item.question, "context": item.text, **best, "windows": len(encodings)}
    if top_k > 1:
        out["top_k"] = found
    return out


def answers(pipeline: PipelineBase, batch: list[Item]) -> Iterator[dict[str, Any]]:
    for item in batch:
        yield answer(pipeline, item)
