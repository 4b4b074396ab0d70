"""Loading Meta's original layout (consolidated.NN.pth + params.json + tokenizer.model) directly."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llm_torch.core.errors import TokenizerError
from llm_torch.core.placement.loading import load_model, resolve_model
from tests.cli_util import run_llm
from tests.test_convert import PROMPT_IDS, spm, tiny_folder, train_spm, write_meta_layout


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_spm()


@pytest.fixture(scope="module")
def meta(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("meta-load")
    hf_folder, ref = tiny_folder(root, spm_model, num_key_value_heads=2)
    folder = root / "llama-2-tiny"
    write_meta_layout(folder, ref, spm_model, shards=2)
    return folder, hf_folder, ref


def test_meta_folder_loads_with_the_original_logits(meta, spm_model):
    folder, _, ref = meta
    assert resolve_model(str(folder)).kind == "meta"
    loaded = load_model(str(folder), dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(PROMPT_IDS), ref(PROMPT_IDS).logits, atol=1e-5, rtol=1e-5)
    assert loaded.dtype == torch.float32 and loaded.generation_config == {}
    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    assert loaded.tokenizer.encode("Hello world") == [1, *processor.encode("Hello world")]


def test_meta_folder_auto_dtype_is_the_checkpoint_dtype(meta, tmp_path, spm_model):
    _, _, ref = meta
    half = tmp_path / "bf16"
    write_meta_layout(half, copy.deepcopy(ref).to(torch.bfloat16), spm_model, shards=1)
    assert load_model(str(half), with_tokenizer=False).dtype == torch.bfloat16


def test_meta_folder_without_tokenizer_model(meta, tmp_path, spm_model):
    _, _, ref = meta
    folder = tmp_path / "no-tok"
    write_meta_layout(folder, ref, spm_model, shards=2)
    (folder / "tokenizer.model").unlink()
    assert load_model(str(folder), with_tokenizer=False).model is not None
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_model(str(folder))


def test_llm_generate_on_a_meta_folder(meta):
    folder, hf_folder, _ = meta
    args = ("Hello world", "-n", "8", "--temperature", "0", "--dtype", "float32", "--format", "json")
    direct = run_llm("generate", "-m", str(folder), *args)
    assert direct.returncode == 0, direct.stderr.decode()
    original = run_llm("generate", "-m", str(hf_folder), *args)
    assert original.returncode == 0, original.stderr.decode()
    a, b = json.loads(direct.stdout), json.loads(original.stdout)
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert a["usage"]["completion_tokens"] == len(a["token_ids"]) > 0


class _Payload:
    """A pickle whose loading would run a shell command (creating `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_never_runs(meta, tmp_path):
    import shutil

    folder, _, _ = meta
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "payload-ran"
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": _Payload(marker)}, evil / "consolidated.01.pth")
    for args in (("convert", str(evil), "-o", str(tmp_path / "out")), ("generate", "-m", str(evil), "hi", "-n", "1")):
        r = run_llm(*args)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1 and err.startswith("error: "), err
        assert "needs code execution" in err and "safetensors" in err and "weights_only" not in err, err
        assert "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
