"""Sane bounds for the sizes a config.json, params.json or GGUF header declares.

Checked before anything proportional to a size is built (a per-layer tuple, gguf-py's name table, a rope
table), so an absurd value is one typed error instead of a hang or an out-of-memory kill. The limits are
far above every published model (Llama 3.1 405B: 126 layers, hidden 16384; Gemma 2: vocab 256000).
"""

from __future__ import annotations

import math
from typing import Any

from llm_torch.core.errors import ConfigError

# field (HF name) -> (smallest, largest) accepted value
LIMITS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 4096),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_attention_heads": (1, 4096),
    "num_key_value_heads": (1, 4096),
    "head_dim": (1, 4096),
    "vocab_size": (1, 1 << 22),
    "max_position_embeddings": (1, 1 << 24),
    "original_max_position_embeddings": (1, 1 << 24),
    "sliding_window": (1, 1 << 24),
}
# Rope floats: scaling factors beyond this describe no trained model; theta only has to be a usable base.
MAX_ROPE_FACTOR = 1024.0
_HINT = "the config is corrupt or not a model's config; fix the value"


def bounded_int(field: str, value: Any, where: str = "config.json", name: str | None = None) -> int:
    """`value` as an int within LIMITS[field], else a ConfigError naming the field (or the file's own key
    `name`), the value and the bound."""
    low, high = LIMITS[field]
    name = name or field
    if isinstance(value, bool) or isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} {name} = {value!r} is not an integer in {low}..{high}", hint=_HINT)
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where} {name} = {value!r} is not an integer in {low}..{high}", hint=_HINT) from None
    if not low <= n <= high:
        raise ConfigError(f"{where} {name} = {n} is outside the sane range {low}..{high}", hint=_HINT)
    return n


def bounded_float(name: str, value: Any, where: str, low: float, high: float) -> float:
    """`value` as a finite float in (low, high], else a ConfigError naming field, value and bound."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if isinstance(value, bool) or not (low < x <= high):
        raise ConfigError(f"{where} {name} = {value!r} is not a number in ({low:g}, {high:g}]", hint=_HINT)
    return x


def check_sizes(c: dict[str, Any], where: str = "config.json") -> None:
    """Every size config dict `c` (HF names, family defaults merged) states, within LIMITS. An absent field
    is left to the builder (required: its KeyError; optional and falsy: the fallback, itself checked)."""
    optional = ("num_key_value_heads", "head_dim", "sliding_window")
    for name in LIMITS:
        value = c.get(name)
        if value is None or name in optional and not value:
            continue
        bounded_int(name, value, where)
