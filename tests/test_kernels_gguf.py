"""GGUF's packed Q4_0 / Q4_1 / Q8_0 blocks multiplied in place (core/kernels/gguf.c) against gguf-py's own
dequantization: within the rounding of the activations to Q8 blocks (and exactly that rounding's product
to fp32 accuracy), each batched row bitwise what it is alone, whatever the thread count, bad operands
refused, and step.c's whole-model forward running projections held as GGUF blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llm_torch.core import kernels
from tests.test_kernels_kquant import _cpu_has

native = kernels.matvec()
pytestmark = pytest.mark.skipif(native is None, reason=f"native kernels unavailable here: {kernels.status().detail}")

KINDS = {kernels.Q4_0: GGMLQuantizationType.Q4_0, kernels.Q4_1: GGMLQuantizationType.Q4_1,
         kernels.Q8_0: GGMLQuantizationType.Q8_0}


def gguf_weight(kind: int, n: int, k: int, seed: int):
    """Random weights quantized by gguf-py: the raw blocks [n, row bytes] and their float64 dequantization."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = quantize(w, KINDS[kind])
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, KINDS[kind]).astype(np.float64))


def q8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to Q8 blocks of 32 as the kernels round it (llama.cpp's quantize_row_q8_0, in fp32)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127.0)).reshape(x.shape)


def q8_error_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per output: |w @ x - w @ q8(x)| <= sum_j |w_j| * step_j / 2, step = max|x| / 127 of x_j's block
    (with fp32 slack)."""
    step = x.abs().reshape(*x.shape[:-1], -1, 32).amax(-1).repeat_interleave(32, -1).double() / 127
    return (step / 2) @ w.abs().T * 1.001 + 1e-5 * (x.double().abs() @ w.abs().T)


def spec(kind, raw, n, k, bias=None):
    return kernels.LinearSpec(kind, raw, n, k, bias=bias)


def test_the_library_multiplies_these_kinds():
    assert {kernels.Q4_0, kernels.Q4_1, kernels.Q8_0} <= native.kinds
    assert {kernels.F32, kernels.F16, kernels.BF16, kernels.I8, kernels.I8Q8, kernels.I4Q8} <= native.kinds


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", [(37, 256), (5, 32), (130, 1536), (576, 576)])
def test_product_is_dequantized_weights_times_x(kind, shape):
    """Against dequantize(W) @ x in float64: within half a Q8 step of x per input; against the product with
    x rounded to those Q8 blocks (what the integer dot products compute), to fp32 accuracy."""
    n, k = shape
    raw, w = gguf_weight(kind, n, k, seed=n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=g) * torch.rand(k // 32, generator=g).repeat_interleave(32) * 4
    got = native.linear(spec(kind, raw, n, k), x).double()
    assert got.shape == (3, n)
    exact = x.double() @ w.T
    assert ((got - exact).abs() <= q8_error_bound(w, x)).all()
    rounded = q8_round(x).double() @ w.T
    assert (got - rounded).abs().max().item() <= 2e-6 * (x.double().abs() @ w.abs().T).max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_bias_is_added_after_the_product(kind):
    raw, _ = gguf_weight(kind, 19, 64, seed=1)
    g = torch.Generator().manual_seed(2)
    x, bias = torch.randn(4, 64, generator=g), torch.randn(19, generator=g)
    assert torch.equal(native.linear(spec(kind, raw, 19, 64, bias), x), native.linear(spec(kind, raw, 19, 64), x) + bias)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k", [(67, 160), (5, 32768)])
def test_batched_rows_are_bitwise_each_row_alone(kind, n, k):
    """B = 1..17 rows in one product: every tile shape, odd weight-row tails, and (K = 32768) X rows split
    into several blocks kept in cache."""
    raw, _ = gguf_weight(kind, n, k, seed=3)
    g = torch.Generator().manual_seed(4)
    X, bias = torch.randn(17, k, generator=g), torch.randn(n, generator=g)
    alone = torch.stack([native.linear(spec(kind, raw, n, k, bias), x) for x in X])
    for B in (range(1, 18) if k < 1000 else (1, 2, 5, 17)):
        assert torch.equal(native.linear(spec(kind, raw, n, k, bias), X[:B]), alone[:B]), f"B={B}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_many_row_tiles_are_bitwise_each_row_alone(kind):
    """B = 1..40 against rows alone: the many-row tiles (several weight rows x four X rows) with every X-row
    tail (B not a multiple of the tile) and weight-row tail (n = 4 k + 3: a pair and an odd row), and X rows
    split into cache blocks (K = 8192: 24 rows a block)."""
    for n, k, batches in ((71, 192, range(1, 41)), (7, 8192, (1, 3, 17, 25, 33, 38))):
        raw, _ = gguf_weight(kind, n, k, seed=12)
        g = torch.Generator().manual_seed(13)
        X, bias = torch.randn(40, k, generator=g), torch.randn(n, generator=g)
        alone = torch.stack([native.linear(spec(kind, raw, n, k, bias), x) for x in X])
        for B in batches:
            assert torch.equal(native.linear(spec(kind, raw, n, k, bias), X[:B]), alone[:B]), f"n={n} B={B}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_many_rows_stay_within_the_q8_bound(kind):
    """A prefill-sized product (B = 67): every row within the bounds of test_product_is_dequantized_weights_times_x."""
    n, k = 99, 576
    raw, w = gguf_weight(kind, n, k, seed=14)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(67, k, generator=g) * torch.rand(k // 32, generator=g).repeat_interleave(32) * 4
    got = native.linear(spec(kind, raw, n, k), x).double()
    assert ((got - x.double() @ w.T).abs() <= q8_error_bound(w, x)).all()
    rounded = q8_round(x).double() @ w.T
    assert (got - rounded).abs().max().item() <= 2e-6 * (x.double().abs() @ w.abs().T).max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_thread_count_does_not_change_a_bit(kind):
    raw, _ = gguf_weight(kind, 203, 576, seed=5)
    X = torch.randn(37, 576, generator=torch.Generator().manual_seed(6))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            results.append(native.linear(spec(kind, raw, 203, 576), X))
        finally:
            torch.set_num_threads(2)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_operands_are_refused(kind):
    raw, _ = gguf_weight(kind, 8, 64, seed=7)
    x = torch.randn(64)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        native.linear(spec(kind, raw, 8, 48), torch.randn(48))
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.linear(spec(kind, raw.view(torch.int8), 8, 64), x)
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.linear(spec(kind, raw[:, :-1], 8, 64), x)  # rows one byte short
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.linear(spec(kind, torch.cat([raw, raw], 1)[:, ::2], 8, 64), x)  # strided
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.linear(spec(kind, raw, 9, 64), x)  # fewer rows than n
    with pytest.raises(ValueError, match=r"x must be fp32 \[\.\.\., 64\]"):
        native.linear(spec(kind, raw, 8, 64), torch.randn(32))
    with pytest.raises(ValueError, match="x must be fp32"):
        native.linear(spec(kind, raw, 8, 64), x.double())
    with pytest.raises(ValueError, match="bias must be fp32"):
        native.linear(spec(kind, raw, 8, 64, torch.randn(7)), x)


# ---- step.c: the whole-model forward over GGUF-packed projections ------------------------------------------


class GGUFLinear(torch.nn.Module):
    """A projection held as GGUF blocks (what the GGUF loader builds): native_linear() hands the blocks to
    the kernels; forward, the reference the PyTorch layers run, is the dequantized weight times x rounded
    to Q8 blocks as the kernels round it."""

    def __init__(self, linear: torch.nn.Linear, kind: int):
        super().__init__()
        w = linear.weight.detach().float().numpy()
        self.kind, self.n, self.k = kind, w.shape[0], w.shape[1]
        self.raw = torch.from_numpy(quantize(w, KINDS[kind]))
        self.weight = torch.from_numpy(dequantize(self.raw.numpy(), KINDS[kind])).float()
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x):
        return torch.nn.functional.linear(q8_round(x), self.weight, self.bias)

    def native_linear(self) -> kernels.LinearSpec:
        return kernels.LinearSpec(self.kind, self.raw, self.n, self.k, bias=self.bias)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    from llm_torch.core.placement.loading import ResolvedModel, load_resolved
    from tests.tiny import LLAMA_BASE, config_dict, hf_model

    folder = tmp_path_factory.mktemp("gguf-tiny")
    hf_model(config_dict(LLAMA_BASE, dict(num_key_value_heads=2, attention_bias=True))).save_pretrained(folder)
    model = load_resolved(ResolvedModel("tiny", "folder", folder), dtype="float32", with_tokenizer=False).model
    kinds = list(KINDS)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            setattr(attn, name, GGUFLinear(getattr(attn, name), kinds[(i + j) % 3]))
        for j, name in enumerate(("gate_proj", "up_proj", "down_proj")):
            setattr(mlp, name, GGUFLinear(getattr(mlp, name), kinds[(i + j + 1) % 3]))
    model.lm_head = GGUFLinear(model.lm_head, kernels.Q4_1)
    return model


@torch.inference_mode()
def test_native_step_runs_gguf_projections(gguf_model):
    """step.c's forward over Q4_0 / Q4_1 / Q8_0 projections (with biases) and head: the logits of the PyTorch
    layers running the same blocks, step after step (an ulp of difference in the residual stream can move an
    activation's code by one step: ~1e-3 of the logits)."""
    from llm_torch.core.engine.runner import NATIVE, NativeRunner, Segment, TorchRunner, make_runner

    fast_runner = make_runner(gguf_model)
    assert isinstance(fast_runner, NativeRunner) and fast_runner.description == NATIVE
    ids = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(8)).tolist()
    out = {}
    for name, runner in (("fast", fast_runner), ("slow", TorchRunner(gguf_model, "reference"))):
        cache = runner.new_cache(1, 16)
        rows = [runner.forward(cache, [Segment(0, ids[:3])])[0]]
        rows += [runner.forward(cache, [Segment(0, [t])])[0] for t in ids[3:]]
        out[name] = torch.stack(rows)
    scale = out["slow"].abs().max().item()
    assert scale > 0.05
    assert (out["fast"] - out["slow"]).abs().max().item() <= 2e-3 * max(1.0, scale)


@torch.inference_mode()
def test_native_step_rows_are_bitwise_alone_and_batched(gguf_model):
    from llm_torch.core.engine.runner import Segment, make_runner

    runner = make_runner(gguf_model)
    seqs = [torch.randint(3, 256, (5,), generator=torch.Generator().manual_seed(s)).tolist() for s in (9, 10, 11)]
    alone = []
    for slot, ids in enumerate(seqs):
        cache = runner.new_cache(3, 8)
        alone.append(torch.stack([runner.forward(cache, [Segment(slot, [t])])[0] for t in ids]))
    cache = runner.new_cache(3, 8)
    together = [runner.forward(cache, [Segment(s, [seqs[s][t]]) for s in range(3)]) for t in range(5)]
    for s in range(3):
        assert torch.equal(torch.stack([step[s] for step in together]), alone[s])


@pytest.mark.slow  # builds a second library: ~40 s on 2 busy cores
@pytest.mark.skipif(not _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), reason="no AVX-512 VNNI here")
def test_an_avx512_vnni_build_gives_the_same_bits(monkeypatch, tmp_path):
    """gguf.c's AVX-512 tiles (two outputs per register, integer offsets for Q4_0's -8 and Q8_0's signs) sum
    the same exact integers with the same FMAs per lane: bitwise the AVX2 build, for decode and every tile edge."""
    monkeypatch.setattr(kernels, "FLAGS", (*kernels.FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"))
    monkeypatch.setenv("LLM_KERNEL_CACHE", str(tmp_path))
    wide, status = kernels._try_load()
    assert wide is not None, status.detail
    X = torch.randn(21, 192, generator=torch.Generator().manual_seed(16))
    for kind in KINDS:
        raw, _ = gguf_weight(kind, 71, 192, seed=17)
        s = spec(kind, raw, 71, 192, torch.randn(71, generator=torch.Generator().manual_seed(18)))
        for B in (1, 2, 5, 8, 9, 21):
            assert torch.equal(wide.linear(s, X[:B]), native.linear(s, X[:B])), f"{kind} B={B}"
