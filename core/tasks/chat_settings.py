"""What `/set` changes in a chat (answer length and sampling), parsed from text or a saved file."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from llm_torch.core.errors import InputError
from llm_torch.core.engine.sampling_spec import SamplingSpec

SETTING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens", "repetition_penalty", "seed")
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class ChatSettings:
    """What `/set` changes: the answer length and the sampling spec."""

    max_new_tokens: int = 512
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def as_dict(self) -> dict[str, Any]:
        out = {"max_new_tokens": self.max_new_tokens}
        out.update({k: getattr(self.sampling, k) for k in SAMPLING_KEYS})
        return out

    def with_value(self, key: str, value: Any) -> ChatSettings:
        """A copy with one setting changed; `value` may be text (`/set top_k 40`). Bad key or value: InputError."""
        key = key.strip().lower().replace("-", "_")
        if key not in SETTING_KEYS:
            raise InputError(f"unknown setting '{key}'", hint=f"settings: {', '.join(SETTING_KEYS)}")
        parsed = _parse_setting(key, value)
        if key == "max_new_tokens":
            return replace(self, max_new_tokens=parsed)
        return replace(self, sampling=replace(self.sampling, **{key: parsed}))  # SamplingSpec checks ranges

    def with_values(self, values: dict[str, Any]) -> ChatSettings:
        out = self
        for key, value in values.items():
            out = out.with_value(key, value)
        return out


def _parse_setting(key: str, value: Any) -> Any:
    text = str(value).strip()
    if key == "seed" and (value is None or text.lower() in ("none", "off", "random")):
        return None
    integer = key in ("top_k", "max_new_tokens", "seed")
    try:
        if isinstance(value, bool):
            raise ValueError
        parsed = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise InputError(f"{key} must be {kind}, got '{text}'",
                         hint="e.g. /set temperature 0.7, /set top_k 40, /set seed none") from None
    if not integer and not math.isfinite(parsed):
        raise InputError(f"{key} must be a finite number, got '{text}'")
    if key == "max_new_tokens" and parsed < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {parsed}")
    return parsed
