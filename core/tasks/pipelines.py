"""Task pipelines over a loaded model: inputs in, one plain dict per input out, in input order.

The Pipeline checks that the model serves the task and hands each batch to the task's step: classify.py
(text and token classification), qa.py, embed.py, or the Engine for text generation. UI-free: warnings go to
a callback, errors are typed (errors.py); results are yielded batch by batch, so a reader that stops early
(`| head -1`) does not wait for the whole input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from llm_torch.core.errors import InputError
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.model.model import HEADS
from . import classify, embed, qa
from .base import PipelineBase, PipelineOptions
from .inputs import TASKS, Item, Warn, batched, no_warn

# head kind (loading.head_kind / model.HEADS) -> the task it serves
TASK_OF_HEAD = {
    "causal_lm": "text-generation",
    "sequence_classification": "text-classification",
    "token_classification": "token-classification",
    "question_answering": "question-answering",
    "feature_extraction": "feature-extraction",  # served by `llm embed` (embed.py), not by `llm run`
}

# task -> its step: one batch of items in, one result per item out
STEPS = {
    "text-classification": classify.labels,
    "token-classification": classify.entities,
    "question-answering": qa.answers,
}


def model_task(model) -> str:
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


class Pipeline(PipelineBase):
    """One task over one loaded model; `run(items)` yields a dict per item, in order."""

    def __init__(self, model, tokenizer, task: str, options: PipelineOptions | None = None, *, warn: Warn = no_warn):
        super().__init__(model, tokenizer, options, warn=warn)
        self.task = task
        if self.options.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.options.batch_size}")
        if self.options.aggregation not in ("none", "simple"):
            raise InputError(f"unknown aggregation '{self.options.aggregation}'", hint="none or simple")
        if self.options.truncate not in ("warn", "error"):
            raise InputError(f"unknown truncation mode '{self.options.truncate}'", hint="warn or error")
        if task == "feature-extraction":
            embed.check_pooling(self.options.pooling)

    def run(self, items: Iterable[Item]) -> Iterator[dict[str, Any]]:
        size = self.options.batch_size
        if self.task == "text-generation":
            # Continuous batching: up to `size` prompts in flight, a new one joining as soon as one finishes.
            yield from self._generate(items, size)
            return
        if self.task == "feature-extraction":
            done = 0
            for batch in batched(items, size):
                yield from embed.features(self, batch, done)
                done += len(batch)
            return
        step = STEPS[self.task]
        if self.task == "text-classification" and self.model.config.pad_token_id is None:
            # Without a pad id the last real token of a padded row cannot be found (HF refuses too).
            size = 1
        for batch in batched(items, size):
            yield from step(self, batch)

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
