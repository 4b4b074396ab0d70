"""A forward step over a batch of token rows through the whole model in one native call (core/kernels/step.c).

On the CPU the ~30 tensor ops per layer cost about as much as reading the weights for one token
(SmolLM2: ~20 ms/token of dispatch and Python for 30 layers, ~13 ms of matrix-vector products).
NativeStep runs everything between the embedding and the logits in C over the same weights and the
same KV cache tensors as the PyTorch layers, for any mix of rows: one token of each of many sequences
(batched decode), consecutive tokens of one sequence (a prompt chunk), or both in one call. Each weight
matrix is read once per call for all rows. The embedding, rope tables, final soft-cap and sampling stay
in PyTorch. The layers in core/model/layers.py stay the definition: tests/test_native_step.py compares the two.
Where a model has something step.c does not compute, `NativeStep` raises Unsupported saying what.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from llm_torch.core import kernels
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import DecoderLayer, Linear, RMSNorm

# config.ACTIVATIONS' functions -> step.c's activation codes.
_ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


class Unsupported(Exception):
    """Something in the model the native step does not compute (the message says what)."""


def linear_spec(module) -> kernels.LinearSpec | None:
    """A projection as the kernels read it, or None: a weight they do not read.

    Our Linear (fp32 / fp16 / bf16 rows); GGUF-packed (core/model/gguf_layers.py) and quant's int8 / int4
    layers describe themselves (native_linear)."""
    if isinstance(module, Linear):
        w = module.weight.detach()
        if w.dtype not in kernels.FLOAT_KINDS or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous():
            return None
        bias = None if module.bias is None else module.bias.detach().float().contiguous()
        return kernels.LinearSpec(kernels.FLOAT_KINDS[w.dtype], w, w.shape[0], w.shape[1], bias=bias)
    native = getattr(module, "native_linear", None)
    return native() if native is not None else None


class NativeStep:
    """Built once per model (runner.NativeRunner); holds references to every tensor it points to."""

    def __init__(self, mv: kernels.MatVec, lm) -> None:
        decoder = lm.model
        cfg = decoder.config
        if cfg.activation not in _ACTS:
            raise Unsupported(f"activation {cfg.hidden_act!r}")
        if cfg.head_dim > 1024 or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise Unsupported(f"{cfg.num_attention_heads} heads over {cfg.num_key_value_heads} key/value heads of {cfg.head_dim}")
        self._mv = mv
        self._keep: list[torch.Tensor] = []
        self.config = cfg
        layers = (kernels.CLayer * cfg.num_hidden_layers)()
        for i, layer in enumerate(decoder.layers):
            if type(layer) is not DecoderLayer:
                raise Unsupported(f"layer {i} is a {type(layer).__name__}")
            self._fill_layer(layers[i], layer, cfg)
        self._layers = layers
        attn = decoder.layers[0].self_attn
        self.model = kernels.CModel(
            n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            vocab=cfg.vocab_size, sandwich=int(bool(cfg.sandwich_norms)), act=_ACTS[cfg.activation],
            eps=float(cfg.rms_norm_eps), scale=float(attn.scale), softcap=float(attn.softcap or 0.0),
            layers=ctypes.cast(layers, ctypes.POINTER(kernels.CLayer)),
            final_norm=self._norm_factor(decoder.norm),
        )
        self._fill_linear(self.model.head, lm.lm_head)
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._work = torch.empty(0)
        self._cache_key = None
        # ctypes releases the GIL: two Python threads stepping through one model (each with its own
        # cache) would otherwise share the work buffers mid-step.
        self._lock = threading.Lock()

    def _fill_layer(self, c: kernels.CLayer, layer: DecoderLayer, cfg) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        # step.c writes each projection's outputs after the previous one's (q|k|v, gate|up), one product per
        # module. Stacked into one matrix they ran no faster (SmolLM2 fp32, 1 thread, CPU ms per token, stacked
        # vs separate: decode 49.3 / 48.3, 8 sequences 9.34 / 9.35, 128-token prefill 4.18 / 4.16).
        proj = [attn.q_proj, attn.k_proj, attn.v_proj]
        up = [mlp.gate_proj, mlp.up_proj]
        for j, m in enumerate(proj):
            self._fill_linear(c.proj[j], m)
        for j, m in enumerate(up):
            self._fill_linear(c.up[j], m)
        self._fill_linear(c.o, attn.o_proj)
        self._fill_linear(c.down, mlp.down_proj)
        c.n_proj, c.n_up = len(proj), len(up)
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if layer.sandwich:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        for j, norm in enumerate(norms):
            c.norm[j] = self._norm_factor(norm)
        c.window = cfg.sliding_window if layer.layer_type == "sliding_attention" else 0

    def _norm_factor(self, norm: RMSNorm) -> int:
        if type(norm) is not RMSNorm:
            raise Unsupported(f"a {type(norm).__name__} norm")
        # The fp32 factor RMSNorm.forward scales by on fp32 activations: w (widened exactly) or 1 + w.
        w = norm.weight.detach().float()
        factor = (1.0 + w) if norm.unit_offset else w.clone()
        return self._hold(factor.contiguous())

    def _fill_linear(self, c: kernels.CLinear, module) -> None:
        spec = linear_spec(module)
        if spec is None:
            w = getattr(module, "weight", None)
            detail = f" with {w.dtype} weights on {w.device.type}" if isinstance(w, torch.Tensor) and w.numel() else ""
            raise Unsupported(f"{type(module).__name__} projections{detail}")
        if spec.kind not in self._mv.kinds:  # GGUF blocks of a kind this library has no kernel for
            raise Unsupported(f"{module.extra_repr()} projections")
        c.kind, c.w, c.n, c.k, c.group = spec.kind, self._hold(spec.weight), spec.n, spec.k, spec.group
        c.scale = None if spec.scale is None else self._hold(spec.scale)
        c.zero = None if spec.zero is None else self._hold(spec.zero)
        c.bias = None if spec.bias is None else self._hold(spec.bias)

    def _hold(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def _cache_struct(self, cache: KVCache):
        tensors = tuple(t for store in cache.stores() for t in store)
        key = (cache.kv_format, *(t.data_ptr() for t in tensors))  # a new cache may reuse a freed one's memory
        if self._cache_key != key:
            L = self.config.num_hidden_layers

            def pointers(store):
                return (ctypes.c_void_p * L)(*(t.data_ptr() for t in store)) if store is not None else None

            def ptr(array, ctype):
                return ctypes.cast(array, ctypes.POINTER(ctype)) if array is not None else None

            keys, values = pointers(cache.keys), pointers(cache.values)
            key_scales, value_scales = pointers(cache.key_scales), pointers(cache.value_scales)
            caps = (ctypes.c_int64 * L)(*(cache.layer_cap(i) for i in range(L)))
            struct = kernels.CCache(ptr(keys, ctypes.c_void_p), ptr(values, ctypes.c_void_p), ptr(caps, ctypes.c_int64),
                                    cache.n_slots, kernels.KV_KINDS[cache.kv_format],
                                    ptr(key_scales, ctypes.c_void_p), ptr(value_scales, ctypes.c_void_p))
            self._cache = (struct, keys, values, key_scales, value_scales, caps, tensors)
            self._cache_key = key
        return self._cache[0]

    def __call__(self, cache: KVCache, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: list[int],
                 positions: list[int], out_rows: list[int]) -> torch.Tensor:
        """x [B, C] fp32 (embedded rows), cos/sin [B, D] -> logits [len(out_rows), V] of those rows.

        Writes every row's keys and values into its slot at its position; the caller advances the cache."""
        with self._lock:
            return self._run(cache, x, cos, sin, slots, positions, out_rows)

    def _run(self, cache, x, cos, sin, slots, positions, out_rows):
        B = x.shape[0]
        x = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        threads = torch.get_num_threads()
        max_cap = max(cache.layer_cap(i) for i in range(self.config.num_hidden_layers))
        work = self._mv.step_work_floats(ctypes.byref(self.model), B, max_cap, threads)
        if self._work.numel() < work:
            self._work = torch.empty(work)
        scratch = self._mv.step_scratch_bytes(ctypes.byref(self.model), B)
        if self._scratch.numel() < scratch:
            self._scratch = torch.empty(scratch, dtype=torch.uint8)
        slot_t = torch.tensor(slots, dtype=torch.int64)
        pos_t = torch.tensor(positions, dtype=torch.int64)
        out_t = torch.tensor(out_rows, dtype=torch.int64)
        logits = torch.empty(len(out_rows), self.config.vocab_size)
        rc = self._mv.forward_rows(
            ctypes.byref(self.model), ctypes.byref(self._cache_struct(cache)), B, x.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), slot_t.data_ptr(), pos_t.data_ptr(), len(out_rows), out_t.data_ptr(), logits.data_ptr(),
            self._work.data_ptr(), self._scratch.data_ptr(), threads,
        )
        if rc != 0:
            raise ValueError(f"native step refused rows at positions {positions} of slots {slots}")
        return logits
