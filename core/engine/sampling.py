"""Logits processors and samplers, each matching the transformers warper of the same name.

All functions take logits [B, V] (float32) and return [B, V]; masked entries become -inf.
"""

from __future__ import annotations

import torch

from .sampling_spec import SamplingSpec


def apply_repetition_penalty(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """context [B, N] token ids seen so far: positive logits are divided, negative multiplied (CTRL paper)."""
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(1, context)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, context, seen)


def apply_frequency_presence(logits: torch.Tensor, generated: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """generated [B, N] ids sampled so far: logits - frequency x count - presence x (count > 0) (OpenAI's definition)."""
    if generated.numel() == 0 or (frequency == 0.0 and presence == 0.0):
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones(generated.shape, dtype=logits.dtype, device=logits.device))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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


def apply_penalties(logits: torch.Tensor, spec: SamplingSpec, context: torch.Tensor | None,
                    generated: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits with the repetition penalty (over `context`) and frequency/presence ones (over `generated`)."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, spec.repetition_penalty)
    if generated is not None:
        logits = apply_frequency_presence(logits, generated, spec.frequency_penalty, spec.presence_penalty)
    return logits


def process_logits(logits: torch.Tensor, spec: SamplingSpec, context: torch.Tensor | None = None,
                   generated: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's order: repetition penalty (over `context`, prompt included), frequency/presence
    penalties (over `generated`), temperature, top-k, top-p, min-p."""
    logits = apply_penalties(logits, spec, context, generated)
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

    def __call__(self, logits: torch.Tensor, context: torch.Tensor | None = None,
                 generated: torch.Tensor | None = None) -> torch.Tensor:
        """-> next token ids [B]."""
        s = self.spec
        if s.greedy or not 0 < s.top_k < logits.shape[-1]:
            logits = process_logits(logits, s, context, generated)
            if s.greedy:
                return logits.argmax(dim=-1)
            return self._draw(logits, None)
        # top-k first, then top-p / min-p on those k only: the same distribution as process_logits (tokens
        # outside the k have probability 0 there), without sorting the whole vocabulary every token
        # (SmolLM2's 49k: ~60% of a decode step).
        logits = apply_penalties(logits, s, context, generated)
        values, index = torch.topk(logits / s.temperature, s.top_k, dim=-1)
        values = min_p_filter(top_p_filter(values, s.top_p), s.min_p)
        return self._draw(values, index)

    def _draw(self, logits: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        pick = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(logits.device)
        return (pick if index is None else index.gather(-1, pick)).squeeze(-1)
