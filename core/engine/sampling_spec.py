"""What sampling a request asks for (SamplingSpec) and where its defaults come from (sampling_spec).

Torch-free: `llm chat --base-url` and the option checks use it without loading torch; core/engine/sampling.py
applies it to logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
