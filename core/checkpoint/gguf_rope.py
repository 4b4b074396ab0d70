"""Rope scaling in llama.cpp's terms (rope.scaling.* keys, the rope_freqs tensor) <-> HF rope_scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from llm_torch.core.errors import CheckpointError, UnsupportedError

# rope.scaling.* keys convert_hf_to_gguf.py writes for YaRN -> HF rope_scaling keys.
YARN_KEYS = {"yarn_attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}


def f32_decimal(value: Any) -> Any:
    """A float32 value as the shortest decimal that reads back to it (the converter's input)."""
    if isinstance(value, float) and np.float32(value) == value and math.isfinite(value):
        return float(str(np.float32(value)))
    return value


def rope_scaling_from_gguf(
    get: Callable[..., Any], config: dict[str, Any], rope_freqs: Sequence[float] | None, has_freqs_tensor: bool
) -> dict[str, Any] | None:
    """HF rope_scaling from llama.cpp's rope.scaling.* keys or its rope_freqs tensor."""
    kind = get("rope.scaling.type")
    if kind is None and get("rope.scale_linear") is not None:  # pre-2024 GGUFs
        kind, factor = "linear", get("rope.scale_linear")
    else:
        factor = get("rope.scaling.factor")
    if kind not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": kind}
        if factor is not None:
            scaling["factor"] = f32_decimal(factor)
        orig = get("rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        if kind == "yarn":
            for gguf_key, hf_key in YARN_KEYS.items():
                if (value := get(f"rope.scaling.{gguf_key}")) is not None:
                    scaling[hf_key] = f32_decimal(value)
        return scaling
    if has_freqs_tensor and rope_freqs is None:
        raise ValueError("this GGUF has a rope_freqs tensor: pass gguf_rope_freqs(reader) as rope_freqs")
    if rope_freqs is not None:
        return _llama3_from_rope_freqs(rope_freqs, config["rope_theta"], config["head_dim"])
    return None


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for HF "llama3" scaling (float32 base frequencies, as it has)."""
    import torch  # its float32 arithmetic, so the factors are the converter's to the bit

    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs.double().numpy()
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _llama3_from_rope_freqs(rope_freqs: Sequence[float], theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover HF "llama3" rope parameters from llama.cpp's per-frequency divisors.

    The divisors depend on (factor, orig / (high - low), low / (high - low)) only, so orig is fixed to
    the converter's default 8192 and low/high are solved for; the result is checked against the tensor.
    """
    import torch

    r = np.asarray(rope_freqs, dtype=np.float64)
    if r.shape != (head_dim // 2,):
        raise CheckpointError(f"GGUF rope_freqs has {r.size} values, expected head_dim / 2 = {head_dim // 2}")
    if np.allclose(r, 1.0):
        return None
    factor = float(r.max())
    orig = 8192
    candidates = [(1.0, 4.0)]  # Llama 3.1 / 3.2 / 3.3 all use these
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).double().numpy()
    mid = (r > 1.0 + 1e-6) & (r < factor - 1e-6)
    if mid.sum() >= 2:
        # Inside the ramp 1/r = (1 - s)/factor + s with s = (orig/wavelen - low)/(high - low): linear in 1/wavelen.
        s = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(freqs[mid] / (2 * math.pi), s, 1)
        if slope > 0:
            width = orig / slope
            candidates.append((-intercept * width, -intercept * width + width))
    for low, high in candidates:
        if low <= 0 or high <= low:
            continue
        expected = llama3_rope_factors(theta, head_dim, factor, low, high, orig)
        if np.allclose(expected, r, rtol=1e-4, atol=0):
            return {
                "rope_type": "llama3",
                "factor": f32_decimal(float(np.float32(factor))),
                "low_freq_factor": round(low, 6),
                "high_freq_factor": round(high, 6),
                "original_max_position_embeddings": orig,
            }
    raise UnsupportedError(
        "GGUF rope_freqs tensor does not match Llama 3 rope scaling", hint="only llama3-style rope_freqs are supported"
    )

