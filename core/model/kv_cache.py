"""The KV cache: keys and values for up to `n_slots` sequences, one slot per sequence.

Layout, per layer l: keys and values fp32 (the compute dtype) [n_slots, H_kv, cap_l, D]. Position p of
the sequence in a slot lives at index p % cap_l:
- full-attention layers: cap_l = the allocated capacity (>= every position cached), so index == position;
- sliding-window layers (Gemma 2) with a ring margin m: cap_l = min(capacity, window + m). Once a sequence
  passes cap_l positions the layer keeps only its last cap_l keys, which hold the window. The margin lets
  one forward write up to m + 1 positions of a slot before any of them attends (a prefill chunk), and lets
  a slot be rolled back by up to m positions for prefix reuse (`reusable`).

Memory (bytes) = 2 * n_slots * H_kv * D * 4 * sum over layers of cap_l, with cap_l <= max_len:
`KVCache.bytes_for(config, n_slots, max_len, ring_margin)` gives the bound the caller's budget sets.
The capacity starts small and grows (geometrically, copying what is cached) up to max_len as sequences
need it, so a budget of 8 slots x 8k tokens costs memory only when requests use it.

`lengths[s]` is how many positions slot s holds. The model's forward (PyTorch) and core.engine.native_step write
new positions at lengths[s] and advance it; `truncate` rolls a slot back without touching memory.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from llm_torch.core.errors import ResourceError


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        n_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ring_margin: int | None = None,
        initial_len: int | None = None,
        layer_devices: list[torch.device] | None = None,
    ):
        """ring_margin: None keeps every position in sliding layers too (a plain cache); else see the module doc.
        layer_devices: where each layer's keys and values live when the layers are spread over devices
        (core/placement/device_map.py); positions and masks stay on `device`."""
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {n_slots} x {max_len}")
        self.config = config
        self.n_slots = n_slots
        self.max_len = max_len
        self.ring_margin = ring_margin
        self.dtype, self.device = dtype, torch.device(device)
        self.layer_devices = [torch.device(d) for d in layer_devices] if layer_devices else None
        self.windows = tuple(
            config.sliding_window if t == "sliding_attention" else None for t in config.layer_types
        )
        self.capacity = min(max_len, initial_len or max_len)
        self.lengths = [0] * n_slots
        # Prefix copies made, for a tensor-parallel rank 0 to replay on the others (core.placement.distributed).
        self.journal: list[tuple[int, int, int, int]] | None = None
        self.keys = [self._new(self.layer_cap(i), i) for i in range(config.num_hidden_layers)]
        self.values = [self._new(self.layer_cap(i), i) for i in range(config.num_hidden_layers)]

    @staticmethod
    def layer_caps(config: ModelConfig, capacity: int, ring_margin: int | None) -> list[int]:
        caps = []
        for t in config.layer_types:
            w = config.sliding_window if t == "sliding_attention" else None
            caps.append(capacity if w is None or ring_margin is None else min(capacity, w + ring_margin))
        return caps

    @classmethod
    def bytes_for(cls, config: ModelConfig, n_slots: int, max_len: int, ring_margin: int | None = None,
                  dtype_bytes: int = 4) -> int:
        """The most memory a cache of this budget can take (module doc's formula)."""
        return sum(cls.layer_bytes(config, n_slots, max_len, ring_margin, dtype_bytes))

    @classmethod
    def layer_bytes(cls, config: ModelConfig, n_slots: int, max_len: int, ring_margin: int | None = None,
                    dtype_bytes: int = 4) -> list[int]:
        """bytes_for per layer (a device map places each layer's keys and values beside it)."""
        per_position = 2 * n_slots * config.num_key_value_heads * config.head_dim * dtype_bytes
        return [per_position * cap for cap in cls.layer_caps(config, max_len, ring_margin)]

    def layer_cap(self, layer: int) -> int:
        w = self.windows[layer]
        if w is None or self.ring_margin is None:
            return self.capacity
        return min(self.capacity, w + self.ring_margin)

    def is_ring(self, layer: int) -> bool:
        return self.layer_cap(layer) < self.max_len and self.windows[layer] is not None and self.ring_margin is not None

    def _new(self, cap: int, layer: int) -> torch.Tensor:
        c = self.config
        device = self.layer_devices[layer] if self.layer_devices else self.device
        return torch.zeros(self.n_slots, c.num_key_value_heads, cap, c.head_dim, dtype=self.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---- capacity -----------------------------------------------------------------------------------

    def ensure(self, length: int) -> None:
        """Hold at least `length` positions per slot (<= max_len): grow geometrically, keeping what is cached.

        A ring layer that already wrapped keeps its size; one that has not yet reached window + margin
        holds every position at index == position, so growing copies indices as they are."""
        if length > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions per slot, {length} needed")
        if length <= self.capacity:
            return
        self.grow_to(min(self.max_len, max(length, 2 * self.capacity)), need=length)

    def grow_to(self, capacity: int, *, need: int | None = None) -> None:
        """Exactly `capacity` positions per slot (never shrinks), keeping what is cached."""
        if capacity <= self.capacity:
            return
        old = self.capacity
        self.capacity = capacity
        try:  # all or nothing: every layer's shape must match layer_cap (step.c indexes by it)
            grown = [[self._grow(t, i) for i, t in enumerate(store)] for store in (self.keys, self.values)]
        except (RuntimeError, MemoryError) as e:  # torch's allocators raise RuntimeError subclasses
            self.capacity = old
            if "alloc" not in str(e).lower() and not isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                raise
            size = self.bytes_for(self.config, self.n_slots, capacity, self.ring_margin, self.dtype.itemsize)
            raise ResourceError(f"out of memory growing the KV cache to {need or capacity} positions x "
                                f"{self.n_slots} slots ({size / 2**20:.0f} MiB)",
                                hint="use a smaller max batch or context") from None
        self.keys, self.values = grown

    def _grow(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        cap = self.layer_cap(layer)
        if cap == t.shape[2]:
            return t
        bigger = self._new(cap, layer)
        bigger[:, :, : t.shape[2]] = t
        return bigger

    # ---- slots ----------------------------------------------------------------------------------------

    def truncate_slot(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of {self.lengths[slot]} positions to {length}")
        self.lengths[slot] = length

    def reusable(self, slot: int, length: int) -> int:
        """How many of the first `length` positions of `slot` can be kept when it is rolled back to them.

        A ring keeps the last cap positions written: rolling back to n positions needs the window before n
        ([n - window + 1, n)) still there, i.e. n >= written - cap + window (one position of slack for a
        write an interrupted step may have made); otherwise nothing is reusable."""
        written = self.lengths[slot]
        length = min(length, written)
        for i, w in enumerate(self.windows):
            cap = self.layer_cap(i)
            if w is not None and written > cap and length < written - cap + w:
                return 0
        return length

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Slot dst takes slot src's first `length` positions (src must be able to roll back to them)."""
        if self.journal is not None:
            self.journal.append((src, dst, length, self.lengths[src]))
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if self.layer_cap(i) >= self.lengths[src]:
                    t[dst, :, :length] = t[src, :, :length]
                else:  # a ring: the positions are where src put them
                    t[dst] = t[src]
        self.lengths[dst] = length

    # ---- what the PyTorch layers read and write ------------------------------------------------------

    def key_positions(self, layer: int, slots: list[int], ends: list[int]) -> torch.Tensor:
        """Positions held at each index of `layer` for rows whose slots hold `ends` positions: [B, S]
        (S = the widest row's keys), -1 where nothing is held. Index j holds the last position p < end
        with p % cap == j."""
        cap = self.layer_cap(layer)
        span = min(cap, max(ends))
        j = torch.arange(span, device=self.device)
        end = torch.tensor(ends, device=self.device)[:, None]
        pos = (end - 1) - ((end - 1 - j) % cap)
        return torch.where(j < end, pos, torch.full_like(pos, -1))

    def write(self, layer: int, slots: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H_kv, T, D]: row b's positions starts[b] .. starts[b] + T - 1 into slot slots[b]."""
        cap = self.layer_cap(layer)
        T = k.shape[2]
        if self.is_ring(layer) and T > cap - self.windows[layer] + 1:
            raise ValueError(f"{T} positions at once overrun a {cap}-key ring with a window of {self.windows[layer]}")
        keys, values = self.keys[layer], self.values[layer]
        for b, (slot, start) in enumerate(zip(slots, starts)):
            idx = torch.arange(start, start + T, device=keys.device) % cap
            if start + T <= cap:
                keys[slot, :, start : start + T] = k[b]
                values[slot, :, start : start + T] = v[b]
            else:
                keys[slot, :, idx] = k[b]
                values[slot, :, idx] = v[b]

    def read(self, layer: int, slots: list[int], ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, S, D] of each row's slot, S as key_positions gives."""
        span = min(self.layer_cap(layer), max(ends))
        keys, values = self.keys[layer], self.values[layer]
        if len(slots) == 1:
            s = slots[0]
            return keys[s : s + 1, :, :span], values[s : s + 1, :, :span]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return keys[slots[0] : slots[0] + len(slots), :, :span], values[slots[0] : slots[0] + len(slots), :, :span]
        index = torch.tensor(slots, device=keys.device)
        return keys[index, :, :span], values[index, :, :span]
