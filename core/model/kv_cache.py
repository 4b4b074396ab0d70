"""The KV cache: keys and values for up to `n_slots` sequences, one slot per sequence.

Layout, per layer l: keys and values [n_slots, H_kv, cap_l, D] in the cache's format (`FORMATS`): f32, f16 or
bf16 values, or int8 codes with one fp16 scale per (head, position, block of 32 along D) in `key_scales` /
`value_scales` [n_slots, H_kv, cap_l, D / 32] (llama.cpp's q8_0: x ~ code * scale, scale = max|x| / 127).
Keys and values are rounded when written; `read` widens them to the compute dtype. step.c reads and writes
the same tensors with the same rounding (tests/test_native_step.py). Position p of
the sequence in a slot lives at index p % cap_l:
- full-attention layers: cap_l = the allocated capacity (>= every position cached), so index == position;
- sliding-window layers (Gemma 2) with a ring margin m: cap_l = min(capacity, window + m). Once a sequence
  passes cap_l positions the layer keeps only its last cap_l keys, which hold the window. The margin lets
  one forward write up to m + 1 positions of a slot before any of them attends (a prefill chunk), and lets
  a slot be rolled back by up to m positions for prefix reuse (`reusable`).

Memory (bytes) = 2 * n_slots * H_kv * D * (bytes per value: 4, 2, or 34 / 32 for int8) * sum over layers of
cap_l, with cap_l <= max_len: `KVCache.bytes_for(config, n_slots, max_len, ring_margin, kv_format)` gives the
bound the caller's budget sets.
The capacity starts small and grows (geometrically, copying what is cached) up to max_len as sequences
need it, so a budget of 8 slots x 8k tokens costs memory only when requests use it.

`lengths[s]` is how many positions slot s holds. The model's forward (PyTorch) and core.engine.native_step write
new positions at lengths[s] and advance it; `truncate` rolls a slot back without touching memory.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from llm_torch.core.errors import InputError, ResourceError

# What keys and values are stored as (--kv-cache); "auto" picks one (resolve_format).
FORMATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
CHOICES = ("auto", *FORMATS)
Q8_BLOCK = 32  # int8: values per fp16 scale along head_dim
_NAMES = {v: k for k, v in FORMATS.items() if k != "int8"}


def resolve_format(choice: str, weight_dtype: torch.dtype, device: torch.device | str, quantized: bool = False) -> str:
    """The KV format --kv-cache `choice` gives a model whose weights are stored in `weight_dtype` (quantized: its
    projections are int8 / int4 layers, weight_dtype the rest's).

    auto: on a GPU the activations' dtype (as before); on a CPU fp32 models keep fp32 keys (their parity with
    the reference stays exact), 16-bit and quantized models store f16: half the bytes attention reads per
    token, and 3 more mantissa bits than bf16 (keys and values are normed activations, far inside f16's range;
    llama.cpp's default too). F16C widens 8 per instruction, as cheap as bf16's shift."""
    if choice not in CHOICES:
        raise InputError(f"unknown KV cache format {choice!r}", hint=f"use one of: {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    if torch.device(device).type != "cpu":
        return _NAMES.get(weight_dtype, "f32")
    return "f32" if weight_dtype == torch.float32 and not quantized else "f16"


def value_bytes(kv_format: str, head_dim: int) -> int:
    """Bytes one head's key (or value) at one position takes."""
    if kv_format == "int8":
        return head_dim + 2 * (head_dim // Q8_BLOCK)
    return head_dim * FORMATS[kv_format].itemsize


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 codes [..., D] and fp16 scales [..., D / 32] (step.c's store_q8, bit for bit)."""
    b = x.float().unflatten(-1, (-1, Q8_BLOCK))
    d = (b.abs().amax(-1, keepdim=True) / 127).clamp(max=65504.0).to(torch.float16)
    df = d.float()
    inv = torch.where(df > 0, 1.0 / df, torch.zeros_like(df))
    q = torch.round(b * inv).clamp(-127, 127).to(torch.int8)
    return q.flatten(-2), d.squeeze(-1)


def dequantize_q8(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, Q8_BLOCK)) * d.float().unsqueeze(-1)).flatten(-2).to(dtype)


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
        kv_format: str | None = None,
    ):
        """dtype: what `read` gives (the compute dtype); kv_format: what is stored (FORMATS; None: dtype itself).
        ring_margin: None keeps every position in sliding layers too (a plain cache); else see the module doc.
        layer_devices: where each layer's keys and values live when the layers are spread over devices
        (core/placement/device_map.py); positions and masks stay on `device`."""
        if n_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {n_slots} x {max_len}")
        self.kv_format = kv_format if kv_format is not None else _NAMES[dtype]
        if self.kv_format not in FORMATS:
            raise InputError(f"unknown KV cache format {self.kv_format!r}", hint=f"use one of: {', '.join(FORMATS)}")
        if self.kv_format == "int8" and config.head_dim % Q8_BLOCK:
            raise InputError(f"an int8 KV cache needs a head size that is a multiple of {Q8_BLOCK}, "
                             f"this model's is {config.head_dim}", hint="use --kv-cache f16")
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
        scaled = self.kv_format == "int8"
        self.key_scales = [self._new_scales(self.layer_cap(i), i) for i in range(config.num_hidden_layers)] if scaled else None
        self.value_scales = [self._new_scales(self.layer_cap(i), i) for i in range(config.num_hidden_layers)] if scaled else None

    def stores(self) -> list[list[torch.Tensor]]:
        """Every per-layer tensor list the cache holds (keys, values, and int8's scales): all indexed alike."""
        return [self.keys, self.values] + ([self.key_scales, self.value_scales] if self.key_scales is not None else [])

    @staticmethod
    def layer_caps(config: ModelConfig, capacity: int, ring_margin: int | None) -> list[int]:
        caps = []
        for t in config.layer_types:
            w = config.sliding_window if t == "sliding_attention" else None
            caps.append(capacity if w is None or ring_margin is None else min(capacity, w + ring_margin))
        return caps

    @classmethod
    def bytes_for(cls, config: ModelConfig, n_slots: int, max_len: int, ring_margin: int | None = None,
                  kv_format: str = "f32") -> int:
        """The most memory a cache of this budget can take (module doc's formula)."""
        return sum(cls.layer_bytes(config, n_slots, max_len, ring_margin, kv_format))

    @classmethod
    def layer_bytes(cls, config: ModelConfig, n_slots: int, max_len: int, ring_margin: int | None = None,
                    kv_format: str = "f32") -> list[int]:
        """bytes_for per layer (a device map places each layer's keys and values beside it)."""
        per_position = 2 * n_slots * config.num_key_value_heads * value_bytes(kv_format, config.head_dim)
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
        return torch.zeros(self.n_slots, c.num_key_value_heads, cap, c.head_dim, dtype=FORMATS[self.kv_format],
                           device=device)

    def _new_scales(self, cap: int, layer: int) -> torch.Tensor:
        c = self.config
        device = self.layer_devices[layer] if self.layer_devices else self.device
        return torch.zeros(self.n_slots, c.num_key_value_heads, cap, c.head_dim // Q8_BLOCK, dtype=torch.float16,
                           device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in self.stores() for t in store)

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
            grown = [[self._grow(t, i) for i, t in enumerate(store)] for store in self.stores()]
        except (RuntimeError, MemoryError) as e:  # torch's allocators raise RuntimeError subclasses
            self.capacity = old
            if "alloc" not in str(e).lower() and not isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                raise
            size = self.bytes_for(self.config, self.n_slots, capacity, self.ring_margin, self.kv_format)
            raise ResourceError(f"out of memory growing the KV cache to {need or capacity} positions x "
                                f"{self.n_slots} slots ({size / 2**20:.0f} MiB)",
                                hint="use a smaller max batch or context") from None
        self.keys, self.values = grown[:2]
        if self.key_scales is not None:
            self.key_scales, self.value_scales = grown[2:]

    def _grow(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        cap = self.layer_cap(layer)
        if cap == t.shape[2]:
            return t
        # int8's scales are the only fp16 planes of an int8 cache
        new = self._new_scales if self.kv_format == "int8" and t.dtype == torch.float16 else self._new
        bigger = new(cap, layer)
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
        for store in self.stores():
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
        stored = self._encode(k, v)
        planes = [store[layer] for store in self.stores()]
        for b, (slot, start) in enumerate(zip(slots, starts)):
            if start + T <= cap:
                for plane, x in zip(planes, stored):
                    plane[slot, :, start : start + T] = x[b]
            else:
                idx = torch.arange(start, start + T, device=planes[0].device) % cap
                for plane, x in zip(planes, stored):
                    plane[slot, :, idx] = x[b]

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """New keys and values as stored: rounded to the format (int8: codes, then their scales)."""
        if self.kv_format != "int8":
            dtype = FORMATS[self.kv_format]
            return [k.to(dtype), v.to(dtype)]
        (kq, kd), (vq, vd) = quantize_q8(k), quantize_q8(v)
        return [kq, vq, kd, vd]

    def read(self, layer: int, slots: list[int], ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, S, D] of each row's slot in the compute dtype, S as key_positions gives."""
        span = min(self.layer_cap(layer), max(ends))
        planes = [store[layer] for store in self.stores()]
        if len(slots) == 1:
            got = [p[slots[0] : slots[0] + 1, :, :span] for p in planes]
        elif slots == list(range(slots[0], slots[0] + len(slots))):
            got = [p[slots[0] : slots[0] + len(slots), :, :span] for p in planes]
        else:
            index = torch.tensor(slots, device=planes[0].device)
            got = [p[index, :, :span] for p in planes]
        if self.kv_format == "int8":
            return dequantize_q8(got[0], got[2], self.dtype), dequantize_q8(got[1], got[3], self.dtype)
        return got[0].to(self.dtype), got[1].to(self.dtype)
