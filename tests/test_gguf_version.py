"""What we take from gguf-py beyond its public API, checked so that a gguf upgrade fails here, not at a user's.

core/checkpoint/gguf_reader.py's _FastGGUFReader replaces two private GGUFReader methods (pyproject.toml bounds
gguf to the releases this was verified with); core/checkpoint/gguf.py names tensors by gguf-py's TensorNameMap.
"""

from __future__ import annotations

import inspect

import gguf
import numpy as np
import pytest
import torch

from llm_torch.core.checkpoint.gguf import gguf_tensor_names
from llm_torch.core.checkpoint.gguf_reader import _FastGGUFReader, open_gguf
from llm_torch.core.errors import UnsupportedError
from llm_torch.core.model.config import ModelConfig

# The private methods _FastGGUFReader overrides, with the parameters the stock reader calls them with.
OVERRIDDEN = {
    "_get": ["self", "offset", "dtype", "count", "override_order"],
    "_get_field_parts": ["self", "orig_offs", "raw_type"],
}


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")


def test_overridden_private_methods_keep_their_signatures():
    ours = {name for name in vars(_FastGGUFReader) if name.startswith("_") and not name.startswith("__")}
    assert ours - {"_plain"} == set(OVERRIDDEN)  # a new override must be listed (and checked) here
    for name, params in OVERRIDDEN.items():
        stock = getattr(gguf.GGUFReader, name, None)
        assert stock is not None, f"gguf {_version()} has no GGUFReader.{name}: core/checkpoint/gguf_reader.py needs updating"
        assert _parameters(stock) == params, f"gguf {_version()} changed GGUFReader.{name}"
        assert _parameters(getattr(_FastGGUFReader, name)) == params
    # Read by the overrides: the scalar type table and the byte order flag.
    assert set(gguf.GGUFReader.gguf_scalar_to_np) >= {gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32}
    assert gguf.GGUFReader.byte_order == "I"


def test_the_stock_reader_still_parses_through_our_overrides(tmp_path, monkeypatch):
    """If gguf stopped calling _get_field_parts for arrays, opening would silently be ~15x slower again."""
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}" for i in range(50)])
    w.add_token_scores([float(i) for i in range(50)])
    w.add_tensor("token_embd.weight", np.zeros((50, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    arrays = []
    real = _FastGGUFReader._get_field_parts

    def counting(self, orig_offs, raw_type):
        if raw_type == gguf.GGUFValueType.ARRAY:
            arrays.append(orig_offs)
        return real(self, orig_offs, raw_type)

    monkeypatch.setattr(_FastGGUFReader, "_get_field_parts", counting)
    reader = open_gguf(path)
    assert len(arrays) == 2 and len(reader.fields["tokenizer.ggml.tokens"].data) == 50


def _config(model_type: str, **extra) -> ModelConfig:
    return ModelConfig.from_dict(dict(model_type=model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, **extra))


def test_tensor_names_come_from_gguf_py():
    llama = gguf_tensor_names(_config("llama", attention_bias=True))
    assert llama["model.layers.1.post_attention_layernorm.weight"] == "blk.1.ffn_norm.weight"
    assert llama["model.layers.0.self_attn.o_proj.bias"] == "blk.0.attn_output.bias"
    assert llama["lm_head.weight"] == "output.weight"
    gemma2 = gguf_tensor_names(_config("gemma2", head_dim=16))
    # Sandwich norms: llama.cpp's ffn_norm is Gemma 2's pre-MLP norm, not Llama's post-attention one.
    assert gemma2["model.layers.1.post_attention_layernorm.weight"] == "blk.1.post_attention_norm.weight"
    assert gemma2["model.layers.1.pre_feedforward_layernorm.weight"] == "blk.1.ffn_norm.weight"
    assert gemma2["model.layers.1.post_feedforward_layernorm.weight"] == "blk.1.post_ffw_norm.weight"
    # llama.cpp's Gemma 2 always ties its output to token_embd: there is no output tensor to write.
    assert "lm_head.weight" not in gemma2


def test_untied_gemma2_cannot_be_written_as_gguf(tmp_path):
    from llm_torch.core.checkpoint.base import TensorInfo
    from llm_torch.core.checkpoint.gguf_writer import write_gguf

    class Untied:
        kind = "folder"
        path = tmp_path
        config = _config("gemma2", head_dim=16, tie_word_embeddings=False, query_pre_attn_scalar=16)
        tensors = [TensorInfo("lm_head.weight", (256, 64), torch.float32)]

    with pytest.raises(UnsupportedError, match="'lm_head.weight' has no GGUF name for architecture 'gemma2'"):
        write_gguf(Untied(), tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_yarn_rope_scaling_is_written(tmp_path):
    """The YaRN keys need gguf >= 0.18's writer methods (pyproject.toml's lower bound)."""
    from llm_torch.core.checkpoint.gguf_reader import gguf_metadata
    from llm_torch.core.model.families import family_for

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0,
            "beta_slow": 1.0, "attention_factor": 0.5}
    path = tmp_path / "yarn.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    family_for("llama").gguf.write_config(w, _config("llama", rope_scaling=rope))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta = gguf_metadata(open_gguf(path))
    assert meta["llama.rope.scaling.type"] == "yarn" and meta["llama.rope.scaling.original_context_length"] == 32768
    assert [meta[f"llama.rope.scaling.{k}"] for k in ("factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")] \
        == [4.0, 0.5, 32.0, 1.0]
