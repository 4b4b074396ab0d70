"""Building blocks: RMSNorm, rotary embeddings (+ scaling types), gated MLP, attention with a KV cache.

Shapes: B batch, T new tokens, S cached keys, H query heads, H_kv key/value heads, D head dim, C hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def compute_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Activations' dtype for weights stored in `weight_dtype`.

    CPUs without native bf16/fp16 math run those matmuls far slower than fp32 (~300x for bf16 on
    AVX2), so on CPU low-precision weights are only a storage format: activations stay fp32.
    """
    if device.type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight_dtype


def k_major_weights(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmul weights [out, in] should be stored transposed in memory ([in, out] rows).

    Only where decode runs on torch's kernels: on CPU, MKL's fp32 matrix-vector product over a
    K-major weight (x @ W^T with W^T contiguous) reads ~1.2-2x faster than over rows (SmolLM2 fp32
    decode 12.0 -> 14.1 tok/s), and prefill's GEMM is as fast either way. The native kernels
    (core.kernels, which decode whenever they load) want rows.
    """
    if device.type != "cpu" or dtype != torch.float32:
        return False
    from llm_torch.core import kernels

    return kernels.matvec() is None


def empty_weight(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, k_major: bool) -> torch.Tensor:
    """Uninitialised storage for a 2-D weight, K-major when asked: same shape, transposed strides."""
    if k_major and len(shape) == 2:
        return torch.empty(shape[::-1], dtype=dtype, device=device).t()
    return torch.empty(shape, dtype=dtype, device=device)


def use_native_kernels() -> bool:
    """Build (first use) and load the native kernels; -> whether they run here. The loader calls it before
    placing weights, since it decides their layout (k_major_weights)."""
    from llm_torch.core import kernels

    return kernels.matvec() is not None


class Linear(nn.Linear):
    """nn.Linear (same parameter names) that also runs weights stored in a narrower dtype than x."""

    def reset_parameters(self) -> None:
        # Weights always come from a checkpoint; random init on the meta device would even import
        # torch._dynamo (~2 s) through the reference kernels.
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        # Narrow storage (fp16/bf16 weights on CPU, fp32 activations): widen the weights for the product,
        # so every token is computed in fp32 like the native kernels do (core.kernels).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass  # filled from the checkpoint, like Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x if dtype == torch.float32 else x.float()  # (no-op casts still cost a dispatch per call)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            # Gemma: scale by (1 + w) in fp32, then cast (the reference's order of operations).
            return (h * (1.0 + self.weight.float())).to(dtype)
        # Llama: cast back first, then scale in the weight's dtype.
        return self.weight * (h if dtype == torch.float32 else h.to(dtype))


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [D/2] and the attention factor cos/sin are scaled by, per rope type.

    seq_len: the sequence length dynamic NTK scales for (others ignore it); up to max_position_embeddings
    the frequencies are the unscaled ones."""
    p = config.rope_parameters
    dim = config.head_dim
    base = float(p["rope_theta"])
    rope_type = p["rope_type"]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    max_pos = config.max_position_embeddings
    if rope_type == "dynamic" and seq_len is not None and seq_len > max_pos:
        # NTK-aware: grow the base once the sequence outruns the trained context. The same expression on the
        # same types as transformers' _compute_dynamic_ntk_parameters at run time (seq_len an int64 tensor,
        # so the base is computed in fp32), which its frequencies match bitwise.
        factor = p["factor"]
        n = torch.tensor(seq_len, dtype=torch.int64)
        base = p["rope_theta"] * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        return inv_freq / float(p["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, p), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(config, base, dim)
    return inv_freq, 1.0


def rope_reuse_limit(config: ModelConfig, cached_prompt: int, prompt: int) -> int | None:
    """How many cached keys of a sequence whose prompt had `cached_prompt` tokens can serve a new prompt of
    `prompt` tokens (None: any). Only dynamic NTK limits it: a prompt longer than max_position_embeddings
    has all its keys rotated with frequencies for its own length, so they serve only a prompt of that
    length, and only up to it (keys generated after it were rotated for other lengths)."""
    if config.rope_parameters["rope_type"] != "dynamic":
        return None
    trained = config.max_position_embeddings
    if cached_prompt <= trained and prompt <= trained:
        return None  # both unscaled over the positions a prompt of `prompt` tokens can reuse
    return cached_prompt if cached_prompt == prompt else 0


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(config: ModelConfig, base: float, dim: int) -> tuple[torch.Tensor, float]:
    p = config.rope_parameters
    factor = float(p["factor"])
    orig = float(p["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the original (extrapolated) frequency per dimension
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.dynamic = config.rope_parameters["rope_type"] == "dynamic"
        # Computed on the CPU even inside a meta-device build: small, and meta-device arithmetic
        # would pull in torch's symbolic-shape machinery (seconds of import time).
        with torch.device("cpu"):
            inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq = inv_freq.to(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, signed sin [B, T, 1, D] in `dtype` (computed in fp32 like the reference).

        lengths: per row, the sequence length dynamic NTK scales for (None: the row's last position + 1, as
        transformers' dynamic_rope_update takes max(position_ids) + 1). The sin half that multiplies the
        negated half of rotate_half(x) carries the sign instead (apply_rope), and the head axis is added
        once here rather than in every layer.
        """
        inv_freq = self.inv_freq[None, None]  # [1, 1, D/2]
        if self.dynamic:
            # Per row, never per batch (transformers takes the batch's longest): a sequence's tokens must
            # not depend on its batch companions.
            if lengths is None:
                lengths = (position_ids.max(dim=1).values + 1).tolist()
            max_pos = self.config.max_position_embeddings
            if max(lengths) > max_pos:
                rows = [rope_inv_freq(self.config, n)[0].to(inv_freq.device) if n > max_pos else self.inv_freq
                        for n in lengths]
                inv_freq = torch.stack(rows)[:, None]  # [B, 1, D/2]
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, signed sin [B, T, 1, D] (RotaryEmbedding). Rotate-half layout (HF checkpoints;
    GGUF is un-permuted on load): x * cos + rotate_half(x) * sin, where rotate_half(x) * sin =
    roll(x, D/2) * [-sin, sin]: the same products, bit for bit, in 4 ops instead of 7."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# config.ACTIVATIONS' functions.
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(c, i, bias=bias)
        self.up_proj = Linear(c, i, bias=bias)
        self.down_proj = Linear(i, c, bias=bias)
        self.act = _ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        c, bias = config.hidden_size, config.attention_bias
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = Linear(c, q_rows, bias=bias)
        self.k_proj = Linear(c, kv_rows, bias=bias)
        self.v_proj = Linear(c, kv_rows, bias=bias)
        self.o_proj = Linear(q_rows, c, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, kv) -> torch.Tensor:
        """x [B, T, C]; mask bool [B|1, 1, T, S] over the keys attended, or None: causal over the T new
        tokens when they are all there is, everything when T == 1; kv: this layer's model.CacheLayer or None."""
        B, T, _ = x.shape
        H, H_kv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, H_kv, D), cos, sin)
        v = self.v_proj(x).view(B, T, H_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if kv is not None:
            k, v = kv.update(k, v)  # written to the cache; -> every key this row attends over
        if self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads
            )
        else:
            out = self._softcapped_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _softcapped_attention(self, q, k, v, mask):
        # SDPA cannot soft-cap logits, so this path is explicit (eager, as the reference runs Gemma 2).
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, H, T, S]
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None and q.shape[2] > 1:
            T = q.shape[2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        eps, off = config.rms_norm_eps, config.norm_unit_offset
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, off)
        # Llama: post_attention_layernorm normalises the MLP input. With sandwich norms (Gemma 2) it
        # normalises the attention output, and two more norms wrap the MLP.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, off)
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, off)

    def forward(self, x, cos, sin, mask, kv):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        if self.sandwich:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))
