"""Attention masks: the one builder used by the model's forward AND by `llm visualize-mask`.

Convention: a bool tensor where True means "query may attend to this key".
Queries and keys are indexed by cache slot; with left padding, padded slots are masked out,
and slot distance equals position distance between real tokens, so windows can use slots.
"""

from __future__ import annotations

import torch


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    q_offset: int = 0,
    sliding_window: int | None = None,
    padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window, optionally padded) mask of shape [B|1, 1, q_len, kv_len].

    q_offset: slot of the first query (tokens already in the cache).
    sliding_window: a key is visible when 0 <= q - k < sliding_window (the reference's convention).
    padding_mask: [B, >= kv_len], True/1 for real tokens.
    """
    q = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :kv_len].to(device=allowed.device, dtype=torch.bool)
    return allowed


def layer_type_masks(
    layer_types: tuple[str, ...],
    sliding_window: int | None,
    q_len: int,
    kv_len: int,
    *,
    q_offset: int = 0,
    padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """One mask per distinct layer type ("full_attention", "sliding_attention")."""
    return {
        t: attention_mask(
            q_len,
            kv_len,
            q_offset=q_offset,
            sliding_window=sliding_window if t == "sliding_attention" else None,
            padding_mask=padding_mask,
            device=device,
        )
        for t in dict.fromkeys(layer_types)
    }
