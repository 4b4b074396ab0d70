"""Native Q4_K / Q5_K / Q6_K products (core/kernels/gguf_k.c) on raw GGUF super-blocks: equal to gguf-py's
dequantized weight times x (exactly, up to fp32 rounding, when x is representable in Q8_K; else within the
Q8_K rounding of x), each batched row bitwise what it is alone, any thread count, bad shapes refused; and
step.c's whole-model step dispatching to them.

gguf-py 0.19 cannot quantize K types, so the weights are random bytes (every byte pattern is a valid block)
with sane fp16 d / dmin written over the scale fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llm_torch.core import kernels

native = kernels.matvec()
needs_native = pytest.mark.skipif(native is None, reason=f"native kernels unavailable here: {kernels.status().detail}")

GGML = {kernels.Q4_K: GGMLQuantizationType.Q4_K, kernels.Q5_K: GGMLQuantizationType.Q5_K,
        kernels.Q6_K: GGMLQuantizationType.Q6_K}
KINDS = pytest.mark.parametrize("kind", list(GGML), ids=["q4_k", "q5_k", "q6_k"])


def k_weight(kind: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks uint8 [n, row bytes] and their float64 dequantization [n, k] by gguf-py."""
    rng = np.random.default_rng(seed)
    elems, size, _ = kernels.GGUF_BLOCKS[kind]
    blocks = rng.integers(0, 256, (n, k // elems, size), dtype=np.uint8)

    def fp16(scale: float) -> np.ndarray:
        return (rng.random((n, k // elems)) * scale + scale / 10).astype(np.float16).view(np.uint8).reshape(n, k // elems, 2)

    if kind == kernels.Q6_K:
        blocks[..., 208:210] = fp16(0.01)  # d after ql, qh and the int8 scales
    else:
        blocks[..., 0:2], blocks[..., 2:4] = fp16(0.01), fp16(0.01)  # d, dmin
    raw = blocks.reshape(n, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, GGML[kind]).astype(np.float64))


def spec(kind, raw, n, k, bias=None):
    return kernels.LinearSpec(kind, raw, n, k, bias=bias)


@needs_native
def test_the_library_multiplies_the_k_quant_kinds():
    assert {kernels.Q4_K, kernels.Q5_K, kernels.Q6_K} <= native.kinds
    assert {kernels.F32, kernels.I4Q8} <= native.kinds


@needs_native
@KINDS
@pytest.mark.parametrize("n,k", [(37, 512), (5, 256), (64, 1536)])
def test_q8k_representable_input_gives_the_exact_product(kind, n, k):
    """x = c / 32 with integer |c| <= 127 and 127 in every super-block is Q8_K exactly (a zero super-block too):
    the integer dot products then leave only fp32 rounding, so any block-math slip shows."""
    raw, w = k_weight(kind, n, k, seed=kind)
    rng = np.random.default_rng(1)
    c = rng.integers(-127, 128, (3, k))
    c[:, ::256] = 127
    c[1, :256] = 0
    x = torch.from_numpy((c / 32).astype(np.float32))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    got = native.linear(spec(kind, raw, n, k, bias), x)
    ref = x.double() @ w.T + bias.double()
    assert got.dtype == torch.float32 and got.shape == (3, n)
    assert (got.double() - ref).abs().max().item() <= 1e-5 * (x.double().abs() @ w.abs().T).max().item() + 1e-5


@needs_native
@KINDS
def test_random_input_is_within_the_q8k_rounding(kind):
    """Q8_K rounds each input to half a step of max|x| / 127 over its 256-element super-block."""
    n, k = 96, 1024
    raw, w = k_weight(kind, n, k, seed=10 + kind)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    got = native.linear(spec(kind, raw, n, k), x)
    half_step = x.double().abs().view(2, -1, 256).amax(-1).repeat_interleave(256, -1) / 254
    bound = half_step @ w.abs().T * 1.001 + 1e-5 * (x.double().abs() @ w.abs().T)
    err = (got.double() - x.double() @ w.T).abs()
    assert (err <= bound).all()
    assert err.max().item() > 0  # x was rounded: the bound is the one in play, not an exact path


@needs_native
@KINDS
def test_batched_rows_are_bitwise_each_row_alone(kind):
    """B = 1 .. 17 rows (every tile width 1-4 and the row blocks): each row bitwise what it gets alone."""
    n, k = 45, 512
    raw, _ = k_weight(kind, n, k, seed=20 + kind)
    X = torch.randn(17, k, generator=torch.Generator().manual_seed(4)) * 3
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5))
    s = spec(kind, raw, n, k, bias)
    alone = torch.stack([native.linear(s, x) for x in X])
    for B in range(1, 18):
        assert torch.equal(native.linear(s, X[:B]), alone[:B])


@needs_native
@KINDS
def test_thread_count_does_not_change_a_bit(kind):
    n, k = 131, 768
    raw, _ = k_weight(kind, n, k, seed=30 + kind)
    X = torch.randn(5, k, generator=torch.Generator().manual_seed(6))
    s = spec(kind, raw, n, k)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            results.append(native.linear(s, X))
        finally:
            torch.set_num_threads(2)
    assert torch.equal(results[0], results[1])


@needs_native
@KINDS
def test_bad_shapes_are_refused(kind):
    elems, size, _ = kernels.GGUF_BLOCKS[kind]
    raw, _ = k_weight(kind, 4, 512, seed=40)
    with pytest.raises(ValueError, match="not a multiple of 256"):
        native.linear(spec(kind, torch.zeros(4, size * 2 + size // 2, dtype=torch.uint8), 4, 640), torch.randn(640))
    with pytest.raises(ValueError, match="weight must be contiguous uint8"):
        native.linear(spec(kind, raw[:, :-1].contiguous(), 4, 512), torch.randn(512))
    with pytest.raises(ValueError, match="weight must be contiguous uint8"):
        native.linear(spec(kind, raw.view(torch.int8), 4, 512), torch.randn(512))
    with pytest.raises(ValueError, match=r"x must be fp32 \[\.\.\., 512\]"):
        native.linear(spec(kind, raw, 4, 512), torch.randn(256))
    with pytest.raises(ValueError, match="bias must be fp32"):
        native.linear(spec(kind, raw, 4, 512, torch.zeros(3)), torch.randn(512))


class KQuantLinear(torch.nn.Module):
    """A projection held as raw K-quant blocks: native_linear() hands them to the kernels; forward() is the
    reference, the dequantized weight times x rounded to Q8_K as gguf_k.c rounds it (numpy fp32, same ops)."""

    def __init__(self, kind: int, linear: torch.nn.Module, seed: int):
        super().__init__()
        self.n, self.k = linear.weight.shape
        self.kind = kind
        self.raw, w = k_weight(kind, self.n, self.k, seed)
        self.register_buffer("w", w.float())
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def native_linear(self) -> kernels.LinearSpec:
        return kernels.LinearSpec(self.kind, self.raw, self.n, self.k, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(q8k_round(x), self.w, self.bias)


def q8k_round(x: torch.Tensor) -> torch.Tensor:
    v = x.detach().float().numpy().reshape(-1, 256)
    top = np.take_along_axis(v, np.abs(v).argmax(-1)[:, None], -1)  # first largest |x|, as the C loop keeps
    with np.errstate(divide="ignore"):
        iscale = np.where(top == 0, np.float32(0), np.float32(-127.0) / top).astype(np.float32)
    q = np.clip(np.rint(iscale * v), -127, 127).astype(np.float32)
    d = np.where(iscale == 0, np.float32(0), np.float32(1.0) / iscale).astype(np.float32)
    return torch.from_numpy((q * d).reshape(x.shape))


@needs_native
def test_the_native_step_runs_k_quant_projections(tmp_path):
    """Every projection of a tiny Llama as Q4_K / Q5_K / Q6_K blocks (kinds cycling, so step.c's linear()
    reaches all three): the native step's logits match the layers' within the ulps that can move a Q8_K code."""
    from llm_torch.core.placement.loading import ResolvedModel, load_resolved
    from tests.test_native_step import assert_same_decode
    from tests.tiny import LLAMA_BASE, config_dict, hf_model

    cfg = config_dict(LLAMA_BASE, dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=64))
    hf_model(cfg).save_pretrained(tmp_path)
    model = load_resolved(ResolvedModel("tiny", "folder", tmp_path), dtype="float32", with_tokenizer=False).model
    kinds = list(GGML)
    count = 0
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, KQuantLinear(kinds[count % 3], getattr(parent, name), seed=100 + count))
                count += 1
    assert_same_decode(model, tol=2e-3, steps=5)


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


@pytest.mark.slow  # builds a second library: ~40 s on 2 busy cores
@needs_native
@pytest.mark.skipif(not _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), reason="no AVX-512 VNNI here")
def test_an_avx512_vnni_build_gives_the_same_bits(monkeypatch, tmp_path):
    """gguf_k.c's VNNI path (dpwssd for madd + add) sums the same exact integers: bitwise the AVX2 result."""
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"))
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path))
    wide, status = kernels._try_load()
    assert wide is not None, status.detail
    X = torch.randn(9, 512, generator=torch.Generator().manual_seed(7))
    for kind in GGML:
        raw, _ = k_weight(kind, 21, 512, seed=50 + kind)
        s = spec(kind, raw, 21, 512, torch.randn(21, generator=torch.Generator().manual_seed(8)))
        assert torch.equal(wide.linear(s, X), native.linear(s, X))
