"""Bad input: each a typed error whose message names the problem; no traceback reaches the user."""

import json

import pytest
import torch

from llm_torch.core.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, UnsupportedError
from llm_torch.core.placement.loading import ResolvedModel, load_model, load_resolved
from tests.cli_util import run_llm
from tests.tiny import LLAMA_BASE, config_dict, hf_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf_model(config_dict(LLAMA_BASE, {})).save_pretrained(folder)
    return folder


def copy_of(src, dst):
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def load(folder):
    return load_resolved(ResolvedModel("t", "folder", folder), dtype="float32", with_tokenizer=False)


def test_missing_folder():
    with pytest.raises(ModelNotFoundError, match="no model at"):
        load_model("./does/not/exist")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no config.json"):
        load(tmp_path)


def test_unknown_model_type(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="model_type 'bert'"):
        load(folder)


def test_unsupported_rope_type(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="rope type 'longrope'"):
        load(folder)


def test_truncated_safetensors(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(folder)


def test_checkpoint_missing_a_tensor(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load(folder)
    assert "missing 1 tensor(s): model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected 1 tensor(s): model.layers.9.extra.weight" in str(e.value)


def test_wrong_shape(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load(folder)


def test_pickle_only_folder_is_refused(tiny_folder, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_folder / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        load(folder)


def test_gguf_with_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="GGUF architecture 'gpt2'"):
        load_model(str(path))
    r = run_llm("generate", "-m", str(path), "hi")
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert r.stderr.decode().count("\n") == 1 and "gpt2" in r.stderr.decode()


def test_cli_reports_checkpoint_errors_in_one_line(tiny_folder, tmp_path):
    folder = copy_of(tiny_folder, tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    r = run_llm("generate", "-m", str(folder), "hi")
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    err = r.stderr.decode()
    assert err.startswith("error:") and err.count("\n") == 1
    r = run_llm("generate", "-m", str(folder), "hi", env={"LLM_DEBUG": "1"})
    assert b"Traceback" in r.stderr


def test_unknown_option_is_a_usage_error():
    """typer raises its vendored click usage errors: they get click's usage text and exit code 2."""
    r = run_llm("generate", "--bogus-flag", "hi")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "No such option: --bogus-flag" in err and "Try 'llm generate -h' for help." in err
    assert "NoSuchOption" not in err and "Traceback" not in err


def test_a_model_that_cannot_fit_is_refused_before_loading(monkeypatch, tmp_path):
    """The estimate from the config alone (no weight read) against the free memory, with the numbers."""
    import torch

    from llm_torch.core.placement import memory
    from llm_torch.core.placement.sizing import param_counts
    from llm_torch.core.model.config import ModelConfig
    from llm_torch.core.errors import ResourceError
    from llm_torch.core.placement.loading import ResolvedModel, load_resolved
    from llm_torch.core.model.model import CausalLM
    from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model

    for cfg in (LLAMA_BASE, config_dict(LLAMA_BASE, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
                GEMMA2_BASE):
        config = ModelConfig.from_dict(cfg)
        with torch.device("meta"):
            assert param_counts(config).total == sum(p.numel() for p in CausalLM(config).parameters())
    hf_model(LLAMA_BASE).save_pretrained(tmp_path)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000)
    with pytest.raises(ResourceError, match=r"needs ~0\.0 GiB of float32 weights \+ 0\.0 GiB of KV cache for 128 tokens on cpu"):
        load_resolved(ResolvedModel("tiny", "folder", tmp_path), dtype="float32", with_tokenizer=False)


def test_devices_are_parsed_and_missing_ones_named(monkeypatch):
    import torch

    from llm_torch.core.errors import ResourceError
    from llm_torch.core.placement.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type in ("cpu", "mps") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1", "0"):
        with pytest.raises(ResourceError, match=rf"device '{name}' is not available here; this machine has: .*cpu"):
            resolve_device(name)
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("1") == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ResourceError, match="this machine has: cuda:0, cuda:1"):
        resolve_device("cuda:2")


def test_a_bare_decoder_checkpoint_names_what_it_can_serve(tmp_path):
    """transformers' LlamaModel (no head) saved as it is: one clear line instead of a key mismatch list."""
    import transformers

    config = transformers.AutoConfig.for_model(**dict(LLAMA_BASE, architectures=["LlamaModel"]))
    transformers.LlamaModel(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"bare decoder .* serves feature extraction only; text-generation needs"):
        load_resolved(ResolvedModel("bare", "folder", tmp_path), dtype="float32", with_tokenizer=False)
