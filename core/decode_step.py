"""The one-token decode step through all decoder layers in one native call (core/kernels/step.c).

For batch 1 on the CPU the ~30 tensor ops per layer cost about as much as reading the weights
(SmolLM2: ~20 ms/token of dispatch and Python for 30 layers, ~18 ms of matrix-vector products).
DecoderModel hands this step the embedded token and rope tables; everything between the embedding
and the final norm runs in C over the same weights and the same KV cache tensors, so prefill
(PyTorch) and decode (here) interleave freely. The layers in core/layers.py stay the definition:
tests/test_decode_step.py compares the two. Where a model has something step.c does not compute,
`build` says what, and the PyTorch layers run.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from . import kernels
from .layers import DecoderLayer, RMSNorm
from .masks import layer_type_masks

STEP = "all layers in one native call"
_ACTS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2, "relu": 3}


class Unsupported(Exception):
    """Something in the model the native step does not compute (the message says what)."""


@dataclass
class _CachePointers:
    keys: object  # ctypes array of the layers' key tensors' data pointers
    values: object
    max_len: int
    tensors: tuple  # the tensors pointed to, kept alive and compared on use


class DecodeStep:
    """Built once per model (DecoderModel._decode_step); holds references to every tensor it points to."""

    def __init__(self, mv: kernels.MatVec, decoder) -> None:
        cfg = decoder.config
        if cfg.hidden_act not in _ACTS:
            raise Unsupported(f"activation {cfg.hidden_act!r}")
        if cfg.head_dim > 1024 or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise Unsupported(f"{cfg.num_attention_heads} heads over {cfg.num_key_value_heads} key/value heads of {cfg.head_dim}")
        self._mv = mv
        self._keep: list[torch.Tensor] = []
        self.layer_types = tuple(dict.fromkeys(cfg.layer_types))
        self.window = cfg.sliding_window
        self.config = cfg
        layers = (kernels.CLayer * cfg.num_hidden_layers)()
        for i, layer in enumerate(decoder.layers):
            if type(layer) is not DecoderLayer:
                raise Unsupported(f"layer {i} is a {type(layer).__name__}")
            self._fill_layer(layers[i], layer)
        self._layers = layers
        attn = decoder.layers[0].self_attn
        self.model = kernels.CModel(
            n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            sandwich=int(bool(cfg.sandwich_norms)), act=_ACTS[cfg.hidden_act], eps=float(cfg.rms_norm_eps),
            scale=float(attn.scale), softcap=float(attn.softcap or 0.0),
            layers=ctypes.cast(layers, ctypes.POINTER(kernels.CLayer)),
        )
        self._scratch = torch.empty(mv.step_scratch_bytes(ctypes.byref(self.model)), dtype=torch.uint8)
        self._work, self._work_for = torch.empty(0), (0, 0)
        self._pointers: _CachePointers | None = None
        # ctypes releases the GIL: two Python threads decoding through one model (each with its own
        # cache) would otherwise share the work buffers mid-step.
        self._lock = threading.Lock()

    def _fill_layer(self, c: kernels.CLayer, layer: DecoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        proj = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
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
        c.window_slot = self.layer_types.index(layer.layer_type)

    def _norm_factor(self, norm: RMSNorm) -> int:
        if type(norm) is not RMSNorm:
            raise Unsupported(f"a {type(norm).__name__} norm")
        # The fp32 factor RMSNorm.forward scales by on fp32 activations: w (widened exactly) or 1 + w.
        w = norm.weight.detach().float()
        factor = (1.0 + w) if norm.unit_offset else w.clone()
        return self._hold(factor.contiguous())

    def _fill_linear(self, c: kernels.CLinear, module) -> None:
        spec = self._spec(module)
        c.kind, c.w, c.n, c.k, c.group = spec.kind, self._hold(spec.weight), spec.n, spec.k, spec.group
        c.scale = None if spec.scale is None else self._hold(spec.scale)
        c.zero = None if spec.zero is None else self._hold(spec.zero)
        c.bias = None if spec.bias is None else self._hold(spec.bias)

    @staticmethod
    def _spec(module) -> kernels.LinearSpec:
        # Every layer kind describes itself (layers.Linear, quant's int8 / int4 modules); others have no such method.
        native = getattr(module, "native_linear", None)
        spec = native() if native is not None else None
        if spec is None:
            w = getattr(module, "weight", None)
            detail = f" with {w.dtype} weights on {w.device.type}" if isinstance(w, torch.Tensor) and w.numel() else ""
            raise Unsupported(f"{type(module).__name__} projections{detail}")
        return spec

    def _hold(self, t: torch.Tensor) -> int:
        self._keep.append(t)
        return t.data_ptr()

    def _cache_pointers(self, cache) -> _CachePointers | None:
        """The cache's tensors as step.c reads them, or None for a cache it cannot use (not fp32 [1, H_kv, S, D])."""
        p = self._pointers
        tensors = (*cache.keys, *cache.values)
        if p is not None and p.max_len == cache.max_len and all(a is b for a, b in zip(p.tensors, tensors)):
            return p
        cfg = self.config
        shape = (1, cfg.num_key_value_heads, cache.max_len, cfg.head_dim)
        for t in tensors:
            if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
                return None
        L = cfg.num_hidden_layers
        keys = (ctypes.c_void_p * L)(*(t.data_ptr() for t in cache.keys))
        values = (ctypes.c_void_p * L)(*(t.data_ptr() for t in cache.values))
        self._pointers = _CachePointers(keys, values, cache.max_len, tensors)
        return self._pointers

    def _work_buffer(self, max_len: int, threads: int) -> torch.Tensor:
        if self._work_for != (max_len, threads):
            need = self._mv.step_work_floats(ctypes.byref(self.model), max_len, threads)
            if self._work.numel() < need:
                self._work = torch.empty(need)
            self._work_for = (max_len, threads)
        return self._work

    def first_visible(self, kv_len: int, start: int) -> object:
        """Per layer type, the first cache slot the new token may attend to (from the model's mask builder)."""
        firsts = [0] * len(self.layer_types)
        if self.window is not None and kv_len > self.window:
            masks = layer_type_masks(self.layer_types, self.window, 1, kv_len, q_offset=start)
            firsts = [int(masks[t][0, 0, 0].to(torch.uint8).argmax()) for t in self.layer_types]
        return (ctypes.c_int64 * len(firsts))(*firsts)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, start: int) -> torch.Tensor | None:
        """x [1, 1, C] fp32 (embedded token), cos/sin [1, 1, 1, D] -> hidden states [1, 1, C] before the final
        norm, or None (nothing done) for a cache the step cannot use: the caller runs the layers instead.

        Writes this token's keys and values into cache slot `start` (the caller advances the cache)."""
        with self._lock:
            return self._run(x, cos, sin, cache, start)

    def _run(self, x, cos, sin, cache, start):
        ptrs = self._cache_pointers(cache)
        if ptrs is None:
            return None
        out = x.reshape(-1).clone()
        cos, sin = cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous()
        firsts = self.first_visible(start + 1, start)
        threads = torch.get_num_threads()
        work = self._work_buffer(cache.max_len, threads)
        rc = self._mv.decode_layers(
            ctypes.byref(self.model), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), ptrs.keys, ptrs.values,
            cache.max_len, start, firsts, work.data_ptr(), self._scratch.data_ptr(), threads,
        )
        if rc != 0:
            raise ValueError(f"native decode step refused position {start} of a {cache.max_len}-slot cache")
        return out.view(1, 1, -1)


def build(decoder) -> tuple[DecodeStep | None, str]:
    """(the step, 'all layers in one native call') or (None, 'PyTorch layers: <why not>')."""
    from .layers import native_matvec

    mv = native_matvec()
    if mv is None:
        return None, "PyTorch layers: the native kernels are off"
    if getattr(mv, "decode_layers", None) is None:
        return None, "PyTorch layers: the native decode step is off"
    try:
        return DecodeStep(mv, decoder), STEP
    except Unsupported as e:
        return None, f"PyTorch layers: not for {e}"
