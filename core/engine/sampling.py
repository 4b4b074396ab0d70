"""Logits processors and samplers, each matching the transformers warper of the same name.

All functions take logits [B, V] (float32) and return [B, V]; masked entries become -inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llm_torch.core.errors import InputError


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    # OpenAI's additive penalties over the tokens generated so far (as vLLM applies them): 0 = off
    frequency_penalty: float = 0.0  # minus this x the token's count
    presence_penalty: float = 0.0  # minus this once the token appeared

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
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InputError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def uses_history(self) -> bool:
        """Whether the logits processors read the tokens seen so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

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


# For models that ship no generation_config.json (GGUF files, Meta's layout): sample as llama.cpp and ollama
# do by default, instead of greedy decoding, which loops on small models ("A lone soul, a lone soul, ...").
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1}


def sampling_in_effect(generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling keys of a generation_config.json that samples as `generation_config` does here (what
    `llm convert` writes): its own keys, or, for a model without one, DEFAULT_SAMPLING in HF's names."""
    if generation_config:
        keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")
        return {k: generation_config[k] for k in keys if k in generation_config}
    return {"do_sample": True, **DEFAULT_SAMPLING}


def sampling_spec(generation_config: dict[str, Any] | None, **given) -> SamplingSpec:
    """What was given (not None) wins; otherwise the model's generation_config (greedy unless it samples);
    without one, DEFAULT_SAMPLING, except that `temperature 0` is plain greedy decoding there."""
    gc = generation_config or {}
    if not gc and given.get("temperature") == 0:
        gc = {"do_sample": False}  # greedy asked for: none of the default sampling profile
    sampled = bool(gc.get("do_sample"))
    defaults = {
        "temperature": float(gc.get("temperature", 1.0)) if sampled else 0.0,
        "top_k": int(gc.get("top_k") or 0) if sampled else 0,
        "top_p": float(gc.get("top_p") or 1.0) if sampled else 1.0,
        "min_p": float(gc.get("min_p") or 0.0) if sampled else 0.0,
        "repetition_penalty": float(gc.get("repetition_penalty") or 1.0),
    } if gc else dict(DEFAULT_SAMPLING)
    chosen = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    return SamplingSpec(**{k: v for k, v in chosen.items() if v is not None})
