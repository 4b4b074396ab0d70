"""Weight formats (core/placement/weight_formats.py): core finds the loader of a quantized checkpoint by its
quant_method, registered at run time or declared as a package entry point, and never imports quant/."""

from __future__ import annotations

import ast
import json
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_torch.core.errors import UnsupportedError
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.placement.weight_formats import ENTRY_POINTS, register_weight_format, weight_format_for
from tests.tiny import LLAMA_BASE, hf_model

ROOT = Path(__file__).resolve().parent.parent


class DoubledHead:
    """A made-up format: the checkpoint stores the LM head at half scale under `lm_head.half`; the format
    takes it out of the stream and builds the head at full scale once the stream is read."""

    def __init__(self, model: nn.Module, quantization_config, tensor_names, dtype, device):
        assert "lm_head.half" in tensor_names()
        self.model, self.dtype, self.device, self.taken = model, dtype, device, {}
        model.lm_head = nn.Identity()  # no meta parameter left for assign_weights to miss

    def filter(self, tensors):
        for name, tensor in tensors:
            if name == "lm_head.half":
                self.taken[name] = tensor
            else:
                yield name, tensor

    def finish(self) -> None:
        head = nn.Linear(*self.taken["lm_head.half"].shape[::-1], bias=False, device=self.device, dtype=self.dtype)
        head.weight.data.copy_(2 * self.taken.pop("lm_head.half"))
        self.model.lm_head = head


def _halved_head_folder(tmp_path: Path, method: str) -> tuple[Path, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    hf_model(LLAMA_BASE).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    head = tensors.pop("lm_head.weight")
    save_file({**tensors, "lm_head.half": (head / 2).contiguous()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    return tmp_path, head


def test_a_registered_format_takes_its_tensors_out_of_the_stream(tmp_path):
    register_weight_format("test-doubled-head", DoubledHead)
    folder, head = _halved_head_folder(tmp_path, "test-doubled-head")
    model = load_resolved(ResolvedModel("t", "folder", folder), dtype="float32", device="cpu", with_tokenizer=False).model
    torch.testing.assert_close(model.lm_head.weight, head)
    assert model(torch.tensor([[5, 9, 11]])).shape == (1, 3, LLAMA_BASE["vocab_size"])


def test_an_unregistered_quant_method_is_a_typed_error(tmp_path):
    folder, _ = _halved_head_folder(tmp_path, "no-such-method")
    with pytest.raises(UnsupportedError, match="quantization method 'no-such-method' is not supported"):
        load_resolved(ResolvedModel("t", "folder", folder), dtype="float32", device="cpu", with_tokenizer=False)


def test_formats_are_found_through_package_entry_points(tmp_path, monkeypatch):
    """What an installed package declares (its dist-info's entry_points.txt) is found when a checkpoint of
    that quant_method is first met, without anything importing the package beforehand."""
    info = tmp_path / "weight_format_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: weight-format-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINTS}]\ntest-entry-point = tests.test_weight_formats:DoubledHead\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert weight_format_for({"quant_method": "test-entry-point"}).__qualname__ == "DoubledHead"
    folder, head = _halved_head_folder(tmp_path / "model", "test-entry-point")
    model = load_resolved(ResolvedModel("t", "folder", folder), dtype="float32", device="cpu", with_tokenizer=False).model
    torch.testing.assert_close(model.lm_head.weight, head)


def test_pyproject_declares_quants_loaders():
    """The declaration a reinstall (pip install -e .) puts in the package metadata, read from the source."""
    from llm_torch.quant.load import QuantizedLoader

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINTS]
    assert set(declared) == {"bitsandbytes", "torchao"}
    for method, value in declared.items():
        assert EntryPoint(method, value, ENTRY_POINTS).load() is QuantizedLoader


def test_loading_never_imports_quant():
    wrong = []
    for path in sorted((ROOT / "core" / "placement").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.startswith("llm_torch.quant")]
    assert wrong == []
