"""Logits processors and samplers, each matching the transformers warper of the same name.

All functions take logits [B, V] (float32) and return [B, V]; masked entries become -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """context [B, N] token ids seen so far: positive logits are divided, negative multiplied (CTRL paper)."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(1, context)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, context, seen)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k best; ties with the k-th value are kept too, as in the reference."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1] = False  # the most likely token always survives
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, spec: SamplingSpec, context: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's order: repetition penalty, temperature, top-k, top-p, min-p."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, spec.repetition_penalty)
    if spec.greedy:
        return logits
    logits = logits / spec.temperature
    logits = top_k_filter(logits, spec.top_k)
    logits = top_p_filter(logits, spec.top_p)
    return min_p_filter(logits, spec.min_p)


class Sampler:
    """Picks the next token per row from logits [B, V]; a seed makes the whole run reproducible."""

    def __init__(self, spec: SamplingSpec):
        self.spec = spec
        self.generator = None
        if not spec.greedy:
            self.generator = torch.Generator()
            if spec.seed is not None:
                self.generator.manual_seed(spec.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """-> next token ids [B]."""
        logits = process_logits(logits, self.spec, context)
        if self.spec.greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)
