"""What `llm visualize-mask` shows: the masks the model's forward builds, as data (no drawing).

The matrices come from core.model.masks.mask_from_positions (the rule the model's forward builds its masks with),
given the positions a left-padded prefill has, so the picture cannot drift from what the model does. They are
numpy arrays: the rule needs no torch, and neither does the command. cli/mask_diagram.py draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llm_torch.core.errors import InputError
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.model.masks import mask_from_positions

PAD_LABEL = "<pad>"  # the token label of a left-padding slot


@dataclass
class MaskView:
    """Tokens of one or more sequences (left-padded to one length) and the mask per layer kind."""

    model: str
    tokens: list[list[str]]  # [B][T] labels; padding slots hold PAD_LABEL
    ids: list[list[int | None]]  # [B][T]; None at padding slots
    real: np.ndarray  # [B, T] bool, True for real tokens
    masks: dict[str, np.ndarray]  # kind -> [B, T, T] bool (True = may attend)
    titles: dict[str, str]  # kind -> panel title
    layers: dict[str, list[int]]  # kind -> the layer indices of that kind shown
    sliding_window: int | None
    layer_types: tuple[str, ...] = field(default_factory=tuple)

    @property
    def length(self) -> int:
        return self.real.shape[1]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "tokens": self.tokens,
            "ids": self.ids,
            "padding": [[not r for r in row] for row in self.real.tolist()],
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "masks": {
                kind: {"title": self.titles[kind], "layers": self.layers[kind], "allowed": m.tolist()}
                for kind, m in self.masks.items()
            },
        }


def build_mask_view(
    config: ModelConfig,
    sequences: list[tuple[list[int], list[str]]],
    *,
    model: str = "",
    sliding_window: int | None = None,
    layer: int | None = None,
    pad_to: int | None = None,
) -> MaskView:
    """The masks a batched (left-padded) prefill of `sequences` (ids, token labels) gets, per layer kind.

    sliding_window overrides the config's window (so a short text shows it); layer picks one layer.
    """
    if not sequences:
        raise InputError("no text given")
    layer_types = tuple(config.layer_types) or ("full_attention",) * config.num_hidden_layers
    window = config.sliding_window
    if sliding_window is not None:
        if sliding_window < 1:
            raise InputError("--sliding-window must be at least 1")
        if "sliding_attention" not in layer_types:
            raise InputError(
                "this model has no sliding-window layers", hint="--sliding-window applies to models like Gemma 2"
            )
        window = sliding_window
    if layer is not None:
        if not 0 <= layer < len(layer_types):
            raise InputError(f"--layer {layer} is out of range", hint=f"the model has layers 0..{len(layer_types) - 1}")
        kinds = [layer_types[layer]]
        layer_lists = {kinds[0]: [layer]}
    else:
        kinds = sorted(dict.fromkeys(layer_types), key=lambda t: (t != "full_attention", t))  # global first
        layer_lists = {k: [i for i, t in enumerate(layer_types) if t == k] for k in kinds}
    longest = max(len(ids) for ids, _ in sequences)
    T = max(longest, pad_to or 0)
    if T == 0:
        raise InputError("the text has no tokens", hint="give some text, or leave --no-special out")
    B = len(sequences)
    real = np.zeros((B, T), dtype=bool)
    tokens: list[list[str]] = []
    ids: list[list[int | None]] = []
    for b, (seq_ids, labels) in enumerate(sequences):
        pad = T - len(seq_ids)
        real[b, pad:] = True
        tokens.append([PAD_LABEL] * pad + list(labels))
        ids.append([None] * pad + list(seq_ids))
    # Positions as masks.attention_mask gives them for a prefill of T slots: -1 marks a padding slot.
    q = np.arange(T)[None]  # [1, T]
    k = np.where(real, q, -1)  # [B, T]
    masks = {kind: mask_from_positions(q, k, window if kind == "sliding_attention" else None)[:, 0] for kind in kinds}
    titles = {}
    for k in kinds:
        what = f"sliding window {window}" if k == "sliding_attention" else "global causal"
        which = layer_lists[k]
        where = f"layer {which[0]}" if len(which) == 1 else f"layers {_ranges(which)}"
        titles[k] = f"{what} ({where})"
    return MaskView(model, tokens, ids, real, masks, titles, layer_lists, window, layer_types)


def _ranges(indices: list[int]) -> str:
    """[0, 2, 4, 6] -> '0,2,4,6'; [0, 1, 2, 3] -> '0-3'."""
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    if len(indices) > 6:
        return ",".join(map(str, indices[:3])) + ",…," + str(indices[-1])
    return ",".join(map(str, indices))
