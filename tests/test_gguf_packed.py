"""GGUF blocks kept packed (core/model/gguf_quant.py, gguf_layers.py, core/placement/gguf_packed.py): decoding
matches gguf-py bit for bit, a packed model computes what the model decoded at load computes, the tied head
shares the embedding's buffer, sizes count the packed bytes. The PyTorch path is tested wherever the native
kernels lack the GGUF kinds (forced here); tests/test_kernels.py covers the kernels themselves.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llm_torch.core import kernels
from llm_torch.core.checkpoint import ResolvedModel
from llm_torch.core.checkpoint.gguf_reader import kernel_kinds
from llm_torch.core.model.gguf_layers import GGUFEmbedding, GGUFLinear
from llm_torch.core.model.gguf_quant import FORMATS, dequantize_rows, row_bytes
from llm_torch.core.placement import gguf_packed, loading
from llm_torch.core.placement.loading import load_resolved, plan_load
from llm_torch.core.checkpoint import open_checkpoint
from llm_torch.core.tools.model_size import weight_bytes_per_token, weights_bytes
from tests.cli_util import needs_model
from tests.test_gguf import llamacpp_permute

PACKED = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ALL_KINDS = frozenset(FORMATS)


def _random_blocks(rng, qtype: Q, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)


# gguf-py quantizes to the K-quants no more: random blocks with scales that give weights of about `scale`.
_K_SCALES = {Q.Q4_K: ((0, 2), 3e-4), Q.Q5_K: ((0, 2), 1.5e-4), Q.Q6_K: ((208,), 4e-4)}


def _quantized(rng, v: np.ndarray, qtype: Q) -> np.ndarray:
    """v in `qtype` blocks: gguf-py's quantizer, or for the K-quants random blocks of v's shape and about its size."""
    if qtype not in _K_SCALES:
        return gguf.quants.quantize(v.astype(np.float32), qtype)
    data = _random_blocks(rng, qtype, v.shape[0], v.shape[1]).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    at, d = _K_SCALES[qtype]
    for i in at:
        data[:, i:i + 2] = (rng.uniform(0.5, 1.0, (len(data), 1)) * d * np.abs(v).mean() * 10
                            ).astype(np.float16).view(np.uint8)
    return data.reshape(v.shape[0], -1)


def _same_bits(ours: np.ndarray, ref: np.ndarray) -> bool:
    # NaNs (from NaN/inf fp16 scales) may differ in sign or payload between numpy and torch; where they are is compared.
    nan = np.isnan(ref)
    return bool(np.array_equal(nan, np.isnan(ours))
                and np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32)))


@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
def test_dequantize_rows_bit_exact_with_gguf_py(qtype):
    """Random bytes hit every nibble, sign and fp16 scale (subnormal, inf, NaN); quantized data the usual values."""
    rng = np.random.default_rng(1)
    kind = kernel_kinds()[qtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    raw = _random_blocks(rng, qtype, 7, 3 * block)
    for data in (raw, _quantized(rng, rng.standard_normal((5, 2 * block)), qtype)):
        ref = gguf.quants.dequantize(data, qtype)
        ours = dequantize_rows(kind, torch.from_numpy(data.copy()), ref.shape[1]).numpy()
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        assert _same_bits(ours, ref)
    edge = np.array([0x0001, 0x03FF, 0x0400, 0x7BFF, 0x7C00, 0xFC00, 0x8000, 0x3C00], dtype=np.uint16)  # fp16 bits
    data = raw[:1].repeat(len(edge), axis=0)
    scale_at = {Q.Q6_K: gguf.GGML_QUANT_SIZES[qtype][1] - 2}.get(qtype, 0)  # Q6_K keeps d last
    data[:, scale_at:scale_at + 2] = edge.view(np.uint8).reshape(-1, 2)
    ref = gguf.quants.dequantize(data, qtype)
    assert _same_bits(dequantize_rows(kind, torch.from_numpy(data), ref.shape[1]).numpy(), ref)
    assert row_bytes(kind, ref.shape[1]) == data.shape[1]


# ----------------------------------------------------------------------------------- a tiny packed model

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 256, 4, 2, 512, 96, 2
HEAD_DIM = HIDDEN // HEADS
# Every packed kind in some projection, an F16 matrix; the embedding (and tied head) Q8_0; ffn_gate of layer 1
# as write_packed_tiny's `decoded` says.
LAYER_TYPES = [
    dict(attn_q=Q.Q4_0, attn_k=Q.Q4_1, attn_v=Q.Q8_0, attn_output=Q.Q4_K, ffn_gate=Q.Q5_K, ffn_up=Q.Q6_K, ffn_down=Q.Q4_1),
    dict(attn_q=Q.Q4_K, attn_k=Q.Q6_K, attn_v=Q.Q5_K, attn_output=Q.Q4_0, ffn_gate=None, ffn_up=Q.Q4_1, ffn_down=Q.F16),
]


def write_packed_tiny(path, *, tied: bool = True, bias: bool = False, decoded: Q | None = None) -> None:
    """decoded: the type of layer 1's gate_proj (default Q5_0, which is decoded at load; None: Q4_0, packed)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name: str, v: np.ndarray, qtype: Q) -> None:
        v = v.astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, v)
        elif qtype == Q.F16:
            w.add_tensor(name, v.astype(np.float16))
        else:
            w.add_tensor(name, _quantized(rng, v, qtype), raw_dtype=qtype)

    add("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)) * 0.5, Q.Q8_0)
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", 1 + rng.standard_normal(HIDDEN) * 0.1, Q.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + rng.standard_normal(HIDDEN) * 0.1, Q.F32)
        for leaf, qtype in LAYER_TYPES[i].items():
            qtype = qtype or decoded or Q.Q4_0
            v = rng.standard_normal(shapes[leaf]) * 0.08
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(leaf)
            add(f"blk.{i}.{leaf}.weight", llamacpp_permute(v, heads) if heads else v, qtype)
            if bias and leaf.startswith("attn_"):
                b = rng.standard_normal(shapes[leaf][0]) * 0.1
                add(f"blk.{i}.{leaf}.bias", llamacpp_permute(b, heads) if heads else b, Q.F32)
    add("output_norm.weight", 1 + rng.standard_normal(HIDDEN) * 0.1, Q.F32)
    if not tied:
        add("output.weight", rng.standard_normal((VOCAB, HIDDEN)) * 0.1, Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def force_packing(monkeypatch):
    """Keep every GGUF kind packed whatever the kernels multiply, and keep their products in PyTorch
    (the kernels' GGUF kinds are tested against these in tests/test_kernels.py)."""
    monkeypatch.setattr(loading, "gguf_packing", lambda device: ALL_KINDS if device.type == "cpu" else frozenset())
    mv = kernels.matvec()
    if mv is not None:
        monkeypatch.setattr(mv, "kinds", mv.kinds - ALL_KINDS)


def _load(path, **kw):
    return load_resolved(ResolvedModel(kind="gguf", path=path, name="tiny"), with_tokenizer=False, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    out = {}
    for name, kw in {"tied": {"decoded": None}, "untied-bias": {"tied": False, "bias": True, "decoded": None},
                     "mixed": {"decoded": Q.Q5_0}}.items():
        write_packed_tiny(d / f"{name}.gguf", **kw)
        out[name] = d / f"{name}.gguf"
    return out


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 4, 17, 50, 91, 3]])


@pytest.mark.parametrize("name", ["tied", "untied-bias"])
@torch.no_grad()
def test_packed_logits_equal_fp32_decoded_model(files, force_packing, name):
    """Same weights, fp32 activations: the packed model's PyTorch path decodes to the fp32 the loader decodes to."""
    packed, decoded = _load(files[name]), _load(files[name], dtype="float32")
    assert isinstance(packed.model.model.layers[0].self_attn.q_proj, GGUFLinear)
    assert not any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in decoded.model.modules())
    assert torch.equal(packed.model(IDS), decoded.model(IDS))
    one = IDS[:, :1]  # the few-rows branch (the kernels' where they have the kind)
    assert torch.equal(packed.model(one), decoded.model(one))


@torch.no_grad()
def test_other_types_decoded_at_load_in_the_default_dtype(files, force_packing):
    """A type without a packed layout (Q5_0) is decoded as before (fp16); norms keep the file's fp32."""
    packed, decoded = _load(files["mixed"]), _load(files["mixed"], dtype="float32")
    layer = packed.model.model.layers[1]
    assert type(layer.mlp.gate_proj).__name__ == "Linear" and layer.mlp.gate_proj.weight.dtype == torch.float16
    assert layer.mlp.down_proj.weight.dtype == torch.float16  # stored F16
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert packed.quantization == "gguf Q4_0+Q4_1+Q8_0+Q4_K+Q5_K+Q6_K"
    torch.testing.assert_close(packed.model(IDS), decoded.model(IDS), atol=2e-3, rtol=0)


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(files, force_packing):
    model = _load(files["tied"]).model
    model.kv_cache = "f32"  # the packed weights' path alone (an f16 cache rounds keys the full forward keeps)
    full = model(IDS)[0]
    cache = model.new_cache(1, 32)
    steps = [model(IDS[:, :6], cache=cache)[0, -1]]
    for t in range(6, IDS.shape[1]):
        steps.append(model(IDS[:, t:t + 1], cache=cache)[0, -1])
    torch.testing.assert_close(torch.stack(steps), full[5:], atol=1e-4, rtol=0)


def test_tied_head_shares_the_embedding_buffer(files, force_packing):
    model = _load(files["tied"]).model
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, GGUFEmbedding) and isinstance(head, GGUFLinear)
    assert head.qweight.data_ptr() == embed.qweight.data_ptr()
    assert embed.qweight.shape == (VOCAB, row_bytes(embed.kind, HIDDEN))
    # Counted once: the whole table (the head reads it every token), one row of it not twice.
    assert weight_bytes_per_token(model) == weights_bytes(model)


def test_sizes_count_packed_bytes(files, force_packing):
    path = files["untied-bias"]
    loaded = _load(path)
    reader = gguf.GGUFReader(path)
    stored = sum(int(t.n_bytes) for t in reader.tensors)  # F32 norms/biases, F16, blocks: as in memory
    assert weights_bytes(loaded.model) == stored
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert weight_bytes_per_token(loaded.model) == stored - int(embed.n_bytes) + int(embed.n_bytes) // VOCAB
    plan = plan_load(open_checkpoint(ResolvedModel("tiny", "gguf", path)), check=False)
    # The plan counts the few float tensors in its dtype (fp16): norms and biases are fp32 here.
    assert 0 < stored - plan.weight_bytes < 4 * HIDDEN * (2 * LAYERS + 1) + 4 * 3 * HIDDEN * LAYERS
    assert f"{plan.weight_bytes / 2**30:.2f} GiB weights (GGUF blocks kept packed)" in plan.lines()[0]


def test_explicit_dtype_decodes_at_load(files, force_packing):
    loaded = _load(files["tied"], dtype="float16")
    assert loaded.quantization is None
    assert not any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in loaded.model.modules())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_packing_follows_the_kernels(files, monkeypatch):
    """Packed are the kinds the native kernels multiply (none where they do not load), on the CPU only."""
    mv = kernels.matvec()
    assert gguf_packed.gguf_packing(torch.device("meta")) == frozenset()
    if mv is None:
        assert gguf_packed.gguf_packing(torch.device("cpu")) == frozenset()
        return
    monkeypatch.setattr(mv, "kinds", mv.kinds - ALL_KINDS | {kernels.Q4_1})
    assert gguf_packed.gguf_packing(torch.device("cpu")) == {kernels.Q4_1}
    monkeypatch.setattr(mv, "kinds", mv.kinds - ALL_KINDS)
    loaded = _load(files["tied"])
    assert loaded.quantization is None and loaded.dtype == torch.float16


def test_native_step_falls_back_for_kinds_without_kernels(files, force_packing):
    from llm_torch.core.engine.runner import TorchRunner, make_runner

    runner = make_runner(_load(files["tied"]).model)
    if kernels.matvec() is not None:
        assert isinstance(runner, TorchRunner) and "gguf" in runner.description


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
@torch.no_grad()
def test_kernel_matches_decoded_rows(kind):
    """Where the kernels have a GGUF kind: their product is the decoded weight's within the Q8 activation
    rounding, and GGUFLinear's few-rows path is theirs."""
    mv = kernels.matvec()
    if mv is None or kind not in mv.kinds:
        pytest.skip("the native kernels lack this kind")
    qtype = {v: k for k, v in kernel_kinds().items()}[kind]
    rng = np.random.default_rng(kind)
    v = rng.standard_normal((48, 512)) * 0.1
    layer = GGUFLinear(kind, torch.from_numpy(_quantized(rng, v, qtype).copy()), 512,
                       bias=torch.from_numpy(rng.standard_normal(48).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((3, 512)).astype(np.float32))
    w = dequantize_rows(kind, layer.qweight, 512)
    ref = torch.nn.functional.linear(x, w, layer.bias)
    got = layer(x)
    assert torch.equal(got, mv.linear(layer.native_linear(), x))
    tol = 0.02 * ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


# ----------------------------------------------------------------------------------- the built-in model


@needs_model
@pytest.mark.slow
@torch.no_grad()
def test_builtin_model_loads_packed_with_the_same_greedy_tokens(force_packing):
    """SmolLM2 Q4_1 (token_embd Q8_0, the tied head): 210 + 1 packed matrices, ~98 MB read per token instead of
    the 269 MB of fp16 weights, and the same greedy tokens as the model decoded at load in fp32."""
    from llm_torch.core.engine.engine import generate
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.placement.loading import load_model

    packed = load_model("smollm2")
    modules = [m for m in packed.model.modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]
    assert len(modules) == 212 and packed.quantization == "gguf Q4_1+Q8_0"  # 210 + embedding + tied head
    per_token = weight_bytes_per_token(packed.model)
    assert 95e6 < per_token < 100e6, per_token
    plan = plan_load(open_checkpoint(loading.resolve_model("smollm2")), check=False)
    assert abs(plan.weight_bytes - weights_bytes(packed.model)) < 1e5  # norms: fp16 in the plan, fp32 here
    decoded = load_model("smollm2", dtype="float32")
    ids = packed.tokenizer.encode("The capital of France is")
    spec = GenerationSpec(max_new_tokens=8)  # decoding every matrix per token on the PyTorch path: slow
    assert generate(packed.model, packed.tokenizer, ids, spec).token_ids == \
        generate(decoded.model, decoded.tokenizer, ids, spec).token_ids
    x = torch.tensor([ids])  # many rows: one GEMM over the decoded weights
    torch.testing.assert_close(packed.model(x)[0, -1], decoded.model(x)[0, -1], atol=1e-4, rtol=0)


def test_float_weights_when_asked_or_for_other_heads(files, force_packing):
    """--quantize needs float Linears (packed=False); the bare decoder (llm embed) decodes at load too;
    quantizing a packed model is refused, not a silent no-op over the packed layers."""
    from llm_torch.core.errors import InputError
    from llm_torch.quant.api import quantize_loaded
    from llm_torch.quant.spec import make_spec

    for loaded in (_load(files["tied"], packed=False), _load(files["tied"], head="feature_extraction")):
        assert loaded.quantization is None
        assert not any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in loaded.model.modules())
    with pytest.raises(InputError, match="already quantized"):
        quantize_loaded(_load(files["tied"]), make_spec("int8"))
