"""Text classification (a label per input) and token classification (a label per token, NER), as
transformers' text-classification and token-classification pipelines return them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .base import PipelineBase
from .inputs import Item


def labels(pipeline: PipelineBase, batch: list[Item]) -> Iterator[dict[str, Any]]:
    """The top label per input (and the --top-k best with top_k > 1)."""
    rows = [pipeline.fit(pipeline.tokenizer.encode(it.text, add_special_tokens=True), it) for it in batch]
    probs = _scores(pipeline, pipeline.forward_rows(rows)).cpu()
    k = min(max(pipeline.options.top_k, 1), probs.shape[-1])
    for item, p in zip(batch, probs, strict=True):
        values, idx = p.topk(k)
        top = [{"label": _label(pipeline, int(i)), "score": float(v)} for v, i in zip(values, idx, strict=True)]
        out = {"input": item.text, **top[0]}
        if k > 1:
            out["top_k"] = top
        yield out


def entities(pipeline: PipelineBase, batch: list[Item]) -> Iterator[dict[str, Any]]:
    """The labelled tokens of each input (special tokens and --ignore-labels left out), grouped per --aggregation."""
    opts = pipeline.options
    # Ids with character offsets into the text and which ids are specials (BOS, ...).
    encoded = [pipeline.tokenizer.encode_with_offsets(it.text, add_special_tokens=True) for it in batch]
    rows = [pipeline.fit(ids, it) for (ids, _, _), it in zip(encoded, batch, strict=True)]
    probs = _scores(pipeline, pipeline.forward_rows(rows)).cpu()
    for b, (item, (_, offsets, special), row) in enumerate(zip(batch, encoded, rows, strict=True)):
        n = len(row)
        p = probs[b, probs.shape[1] - n :]  # left padding: the row's tokens are the last n
        tokens = []
        for t in range(n):
            if special[t]:
                continue
            score, label = p[t].max(-1)
            start, end = offsets[t]
            tokens.append({"index": t, "label": _label(pipeline, int(label)), "score": float(score), "start": start, "end": end})
        found = _aggregate(item.text, tokens, opts.aggregation)
        yield {"input": item.text, "entities": [e for e in found if e["label"] not in opts.ignore_labels]}


def _scores(pipeline: PipelineBase, logits: torch.Tensor) -> torch.Tensor:
    problem = pipeline.model.config.problem_type
    if problem == "multi_label_classification" or logits.shape[-1] == 1:
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=-1)


def _label(pipeline: PipelineBase, i: int) -> str:
    return pipeline.model.config.id2label.get(i, f"LABEL_{i}")


def _aggregate(text: str, tokens: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    def word(start: int, end: int) -> tuple[str, int]:
        while start < end and text[start].isspace():  # byte-level tokens carry their leading space
            start += 1
        return text[start:end], start

    if how == "none":
        out = []
        for t in tokens:
            w, start = word(t["start"], t["end"])
            out.append({"word": w, "label": t["label"], "score": t["score"], "start": start, "end": t["end"], "index": t["index"]})
        return out
    # simple: adjacent tokens with the same tag (B-/I- prefix dropped) form one entity; B- starts a new one.
    groups: list[list[dict[str, Any]]] = []
    for t in tokens:
        tag = t["label"][2:] if t["label"][:2] in ("B-", "I-") else t["label"]
        t = {**t, "tag": tag}
        if groups and groups[-1][-1]["tag"] == tag and not t["label"].startswith("B-"):
            groups[-1].append(t)
        else:
            groups.append([t])
    out = []
    for g in groups:
        w, start = word(g[0]["start"], g[-1]["end"])
        score = sum(t["score"] for t in g) / len(g)
        out.append({"word": w, "label": g[0]["tag"], "score": score, "start": start, "end": g[-1]["end"]})
    return out
