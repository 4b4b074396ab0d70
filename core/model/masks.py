"""Attention masks: the one builder used by the model's forward AND by `llm visualize-mask`.

Convention: a bool tensor where True means "query may attend to this key".
Queries and keys are indexed by cache slot; with left padding, padded slots are masked out,
and slot distance equals position distance between real tokens, so windows can use slots.

mask_from_positions uses only indexing and operators, so it takes numpy arrays as well as tensors: `llm
visualize-mask` applies the same rule without importing torch (core/tools/mask_view.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def mask_from_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """The rule every mask follows, by position: q_pos [B|1, T] of the queries, k_pos [B|1, S] of the keys
    (-1 where a key slot holds nothing) -> bool [B|1, 1, T, S]. A key is visible when it holds something,
    is not in the query's future, and (sliding_window) 0 <= q - k < sliding_window (the reference's convention).
    Tensors in, a tensor out; numpy arrays in, an array out."""
    q = q_pos[:, None, :, None]
    k = k_pos[:, None, None, :]
    allowed = (k >= 0) & (k <= q)
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    return allowed


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
    sliding_window: a key is visible when 0 <= q - k < sliding_window.
    padding_mask: [B, >= kv_len], True/1 for real tokens.
    """
    import torch

    q = torch.arange(q_offset, q_offset + q_len, device=device)[None]
    k = torch.arange(kv_len, device=device)[None]
    if padding_mask is not None:
        real = padding_mask[:, :kv_len].to(device=k.device, dtype=torch.bool)
        k = torch.where(real, k, torch.full_like(k, -1))
    return mask_from_positions(q, k, sliding_window)


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
