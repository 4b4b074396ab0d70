"""What a request asks for (GenerationSpec) and the checks against the model it runs on: its EOS ids, the
context its prompt must fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from llm_torch.core.errors import InputError
from .sampling_spec import SamplingSpec


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 256
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own (config + tokenizer)
    truncate: bool = False  # left-truncate a prompt longer than the context instead of failing
    prefill_chunk: int = 256  # prompt tokens per step of a one-request engine (EngineConfig for the others)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise InputError("a stop string cannot be empty")


def context_length(model) -> int:
    """The longest context the model supports (config.supported_context: rope scaling included)."""
    from llm_torch.core.model.config import supported_context

    return supported_context(model.config)


def eos_ids_for(model, tokenizer, spec: GenerationSpec) -> frozenset[int]:
    if spec.eos_token_ids is not None:
        return frozenset(spec.eos_token_ids)
    ids = set(model.config.eos_token_ids)
    if tokenizer is not None:
        ids.update(tokenizer.eos_token_ids)
    return frozenset(ids)


def fit_prompt(prompt_ids: Sequence[int], context: int, spec: GenerationSpec) -> tuple[list[int], int]:
    """Check (or left-truncate) a prompt against the context; -> (ids, dropped count)."""
    ids = list(prompt_ids)
    room = context - 1  # keep room for at least one generated token
    if len(ids) <= room:
        return ids, 0
    if not spec.truncate:
        raise InputError(
            f"prompt is {len(ids)} tokens but the context holds {context} (room for {room} with one generated)",
            hint="shorten the prompt, or allow left truncation (--truncate)",
        )
    return ids[len(ids) - room :], len(ids) - room
