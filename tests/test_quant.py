"""Quantization: each scheme quantized in memory, saved, reloaded (same logits as in memory, close to the
float model); bitsandbytes checkpoints written by transformers; errors; the CLI; SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_torch.core.errors import CheckpointError, InputError, UnsupportedError
from llm_torch.core.loading import load_model
from llm_torch.quant.api import estimate, quantize_loaded, quantize_to_folder
from llm_torch.quant.spec import make_spec
from tests.cli_util import run_llm
from tests.tiny import LLAMA_BASE, config_dict, hf_model

# Weights of a trained-looking scale (std 0.05; the parity tests' 0.2 makes every weight an outlier).
STD = 0.05
IDS = torch.tensor([[1, 5, 9, 33, 77, 100, 3, 4, 200, 17, 250, 8]])
# Worst |logit error| / max |float logit| on the tiny model, per scheme (measured, with headroom):
# 8-bit schemes ~1.6% (int8 weights + bf16 activations), 4-bit ones 15-26% (K = 64: few groups per row).
TOLERANCE = {"int8": 0.03, "int8-dynamic": 0.04, "llm-int8": 0.03, "int4": 0.25, "nf4": 0.3, "fp4": 0.4}
SCHEMES = {  # test id -> make_spec kwargs
    "int8": dict(scheme="int8"),
    "int8-dynamic": dict(scheme="int8-dynamic"),
    "llm-int8": dict(scheme="llm-int8"),
    "int4": dict(scheme="int4", group_size=32),
    "nf4": dict(scheme="nf4"),
    "fp4": dict(scheme="fp4", double_quant=True),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("float")
    hf_model(config_dict(LLAMA_BASE, dict(num_key_value_heads=2)), std=STD).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def float_logits(float_dir) -> torch.Tensor:
    with torch.inference_mode():
        return load_model(str(float_dir), dtype="float32", with_tokenizer=False).model(IDS)


def _logits(loaded) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(IDS)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantize_save_reload(name, float_dir, float_logits, tmp_path):
    spec = make_spec(**SCHEMES[name])
    in_memory = load_model(str(float_dir), dtype="float32", with_tokenizer=False)
    quantize_loaded(in_memory, spec)
    expected = _logits(in_memory)
    out = quantize_to_folder(str(float_dir), spec, tmp_path / "q", dtype="float32").out
    reloaded = load_model(str(out), with_tokenizer=False)
    got = _logits(reloaded)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same tensors through the same code
    error = (got - float_logits).abs().max() / float_logits.abs().max()
    print(f"{name}: relative error {error:.4f}")
    assert error < TOLERANCE[name], f"{name}: relative error {error:.4f}"
    assert error > 0  # it really is quantized
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == spec.backend
    quantized = [m for m in reloaded.model.modules() if type(m).__name__ in ("Int8Linear", "Int4Linear", "Linear4bit")]
    assert len(quantized) == 2 * 4  # per layer: qkv_proj, o_proj, gate_up_proj, down_proj (lm_head kept)
