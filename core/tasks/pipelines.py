"""Task pipelines over a loaded model: inputs in, one plain dict per input out, in input order.

UI-free: warnings go to a callback, errors are typed (errors.py); the CLI decides how to show them.
Inputs are consumed lazily and results yielded batch by batch, so a reader that stops early (`| head -1`)
does not wait for the whole input.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_torch.core.errors import InputError
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.engine.events import GenerationSpec, context_length

TASKS = ("text-generation", "text-classification", "token-classification", "question-answering")

# head kind (loading.head_kind / model.HEADS) -> the task it serves
TASK_OF_HEAD = {
    "causal_lm": "text-generation",
    "sequence_classification": "text-classification",
    "token_classification": "token-classification",
    "question_answering": "question-answering",
    "feature_extraction": "feature-extraction",  # served by `llm embed` (embed.py), not by `llm run`
}

Warn = Callable[[str], None]


def _no_warn(message: str) -> None:
    pass


@dataclass(frozen=True)
class Item:
    """One input: `text` (the context for question answering) and, for QA, its question."""

    text: str
    question: str | None = None
    where: str = ""  # "line 3", for messages
    id: Any = None  # a .jsonl/.csv record's "id" field, echoed by feature extraction instead of the text


def model_task(model) -> str:
    from llm_torch.core.model.model import HEADS

    for kind, cls in HEADS.items():
        if type(model) is cls:
            return TASK_OF_HEAD[kind]
    raise InputError(f"no task serves a {type(model).__name__} model")


def check_task(task: str, model, model_name: str = "the model") -> None:
    """`--task` must match the head the checkpoint was saved with (config.architectures)."""
    if task not in TASKS:
        raise InputError(f"unknown task '{task}'", hint=f"tasks: {', '.join(TASKS)}")
    has = model_task(model)
    if has != task:
        arch = ", ".join(model.config.architectures) or "no architectures field"
        if has == "feature-extraction":
            raise InputError(f"{model_name} is a bare decoder ({arch}): it serves feature extraction only",
                             hint="use llm embed")
        raise InputError(
            f"{model_name} has no head for '{task}': its config declares {arch}, which serves '{has}'",
            hint=f"use --task {has}, or a model saved for {task}",
        )


# ---------------------------------------------------------------------------------------------- input


def text_lines(lines: Iterable[str], *, first_line: int = 1, warn: Warn = _no_warn) -> Iterator[Item]:
    """`--lines`: each line one input; blank lines are skipped with a warning (they carry no input)."""
    for n, line in enumerate(lines, first_line):
        text = line.rstrip("\r\n")
        if not text.strip():
            warn(f"line {n} is empty; skipped")
            continue
        yield Item(text, where=f"line {n}")


def _from_record(record: Any, column: str | None, question: str | None, where: str) -> Item:
    if isinstance(record, str):
        return Item(record, question, where)
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object or string, got {type(record).__name__}")
    return _item_of(record, column, question, where)


def _item_of(record: dict, column: str | None, question: str | None, where: str) -> Item:
    q = record.get("question", question)
    # QA records name their text "context"; everything else "text" unless --column says otherwise.
    key = column or ("context" if "context" in record else "text")
    if key not in record:
        raise InputError(f"{where}: no field '{key}'", hint=f"fields: {', '.join(record) or 'none'}; pick one with --column")
    value = record[key]
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' is not a string")
    return Item(value, None if q is None else str(q), where, record.get("id"))


def jsonl_items(lines: Iterable[str], *, column: str | None, question: str | None, name: str, warn: Warn = _no_warn) -> Iterator[Item]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            warn(f"{name}: line {n} is empty; skipped")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # Results for earlier lines are already out; naming the line lets the user fix and resume.
            raise InputError(f"{name}: line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
        yield _from_record(record, column, question, f"{name}: line {n}")


def csv_items(lines: Iterable[str], *, column: str | None, question: str | None, name: str) -> Iterator[Item]:
    reader = csv.DictReader(lines)
    try:
        for row in reader:
            yield _from_record(dict(row), column, question, f"{name}: row {reader.line_num}")
    except csv.Error as e:
        raise InputError(f"{name}: line {reader.line_num} is not valid CSV: {e}") from None


def file_items(path: Path, *, column: str | None, question: str | None, warn: Warn = _no_warn) -> Iterator[Item]:
    """`--input FILE`: .txt (one input per line), .jsonl, or .csv (`column` picks the field)."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise InputError(f"cannot read '{path.name}': unknown input format", hint="use a .txt, .jsonl or .csv file")
    try:
        f = path.open(encoding="utf-8", newline="" if suffix == ".csv" else None)
    except OSError as e:
        raise InputError(f"cannot open {path}: {e.strerror or e}") from None
    with f:
        try:
            if suffix == ".txt":
                for item in text_lines(f, warn=warn):
                    yield Item(item.text, question, f"{path.name}: {item.where}")
            elif suffix == ".jsonl":
                yield from jsonl_items(f, column=column, question=question, name=path.name, warn=warn)
            else:
                yield from csv_items(f, column=column, question=question, name=path.name)
        except UnicodeDecodeError:
            raise InputError(f"{path} is not valid UTF-8", hint="convert it to UTF-8, e.g. with iconv") from None


def count_file_items(path: Path) -> int | None:
    """How many inputs `--input FILE` holds, read quickly without the model (a progress total); None when
    the file cannot be read (file_items reports why)."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8", newline="" if suffix == ".csv" else None) as f:
            if suffix == ".csv":
                return sum(1 for _ in csv.DictReader(f))
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------- tasks


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


class Pipeline:
    """One task over one loaded model; `run(items)` yields a dict per item, in order."""

    def __init__(self, model, tokenizer, task: str, options: PipelineOptions | None = None, *, warn: Warn = _no_warn):
        if tokenizer is None:
            raise InputError("the pipelines need a tokenizer")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.options = options or PipelineOptions()
        if self.options.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.options.batch_size}")
        if self.options.aggregation not in ("none", "simple"):
            raise InputError(f"unknown aggregation '{self.options.aggregation}'", hint="none or simple")
        if self.options.truncate not in ("warn", "error"):
            raise InputError(f"unknown truncation mode '{self.options.truncate}'", hint="warn or error")
        if task == "feature-extraction":
            from .embed import check_pooling

            check_pooling(self.options.pooling)
        self.warn = warn
        self.device = next(model.parameters()).device
        self.labels = model.config.id2label

    def run(self, items: Iterable[Item]) -> Iterator[dict[str, Any]]:
        size = self.options.batch_size
        if self.task == "text-generation":
            # Continuous batching: up to `size` prompts in flight, a new one joining as soon as one finishes.
            yield from self._generate(items, size)
            return
        if self.task == "feature-extraction":
            done = 0
            for batch in batched(items, size):
                yield from self._features(batch, done)
                done += len(batch)
            return
        step = {"text-classification": self._classify, "token-classification": self._tokens,
                "question-answering": self._answer}[self.task]
        if self.task == "text-classification" and self.model.config.pad_token_id is None:
            # Without a pad id the last real token of a padded row cannot be found (HF refuses too).
            size = 1
        for batch in batched(items, size):
            yield from step(batch)

    # -- shared

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

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """Ids with character offsets into `text` and which ids are specials (BOS, ...)."""
        return self.tokenizer.encode_with_offsets(text, add_special_tokens=True)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        problem = self.model.config.problem_type
        if problem == "multi_label_classification" or logits.shape[-1] == 1:
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=-1)

    def _label(self, i: int) -> str:
        return self.labels.get(i, f"LABEL_{i}")

    # -- tasks

    def _generate(self, items: Iterable[Item], size: int) -> Iterator[dict[str, Any]]:
        encode = self.options.encode_prompt or (lambda t: self.tokenizer.encode(t, add_special_tokens=True))
        spec = self.options.generation
        engine = Engine(self.model, self.tokenizer, EngineConfig(max_batch=size, max_context=self.options.context))
        taken: list[Item] = []

        def requests():
            for item in items:
                taken.append(item)
                yield encode(item.text), spec

        for n, res in enumerate(engine.run(requests())):
            item = taken[n]
            where = item.where or "input"
            if res.error:
                self.warn(f"{where}: {res.error}")
                yield {"input": item.text, "generated_text": None, "finish_reason": "error", "error": res.error}
                continue
            if res.timings.truncated_tokens:
                self.warn(f"{where}: prompt left-truncated by {res.timings.truncated_tokens} tokens")
            text = item.text + res.text if self.options.return_full_text else res.text
            yield {"input": item.text, "generated_text": text, "finish_reason": res.finish_reason}

    def _classify(self, batch: list[Item]) -> Iterator[dict[str, Any]]:
        rows = [self.fit(self.tokenizer.encode(it.text, add_special_tokens=True), it) for it in batch]
        probs = self._scores(self.forward_rows(rows)).cpu()
        k = min(max(self.options.top_k, 1), probs.shape[-1])
        for item, p in zip(batch, probs, strict=True):
            values, idx = p.topk(k)
            top = [{"label": self._label(int(i)), "score": float(v)} for v, i in zip(values, idx, strict=True)]
            out = {"input": item.text, **top[0]}
            if k > 1:
                out["top_k"] = top
            yield out

    def _tokens(self, batch: list[Item]) -> Iterator[dict[str, Any]]:
        encoded = [self._encode(it.text) for it in batch]
        rows = [self.fit(ids, it) for (ids, _, _), it in zip(encoded, batch, strict=True)]
        probs = self._scores(self.forward_rows(rows)).cpu()
        for b, (item, (_, offsets, special), row) in enumerate(zip(batch, encoded, rows, strict=True)):
            n = len(row)
            p = probs[b, probs.shape[1] - n :]  # left padding: the row's tokens are the last n
            tokens = []
            for t in range(n):
                if special[t]:
                    continue
                score, label = p[t].max(-1)
                start, end = offsets[t]
                tokens.append({"index": t, "label": self._label(int(label)), "score": float(score), "start": start, "end": end})
            entities = _aggregate(item.text, tokens, self.options.aggregation)
            entities = [e for e in entities if e["label"] not in self.options.ignore_labels]
            yield {"input": item.text, "entities": entities}

    def _answer(self, batch: list[Item]) -> Iterator[dict[str, Any]]:
        from .qa import answers

        return answers(self, batch)

    def _features(self, batch: list[Item], first_index: int) -> Iterator[dict[str, Any]]:
        from .embed import features

        return features(self, batch, first_index)


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
