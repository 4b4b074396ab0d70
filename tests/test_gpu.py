"""The PyTorch path on CUDA (marked `gpu`: skipped without a GPU; scripts/gpu_check.sh runs them on one).
The native step never runs there; the engine runs the PyTorch layers with scaled-dot-product attention."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from llm_torch.core.engine.runner import TorchRunner, make_runner
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

SPEC = GenerationSpec(max_new_tokens=12, eos_token_ids=())


def greedy(model, prompts):
    engine = Engine(model, None, EngineConfig(max_batch=len(prompts), keep_logits=True))
    reqs = [engine.add(p, SPEC) for p in prompts]
    while engine.has_work():
        engine.step()
    return reqs


@pytest.mark.parametrize("base", [config_dict(LLAMA_BASE, dict(num_key_value_heads=2)), GEMMA2_BASE],
                         ids=["llama-gqa", "gemma2"])
def test_cuda_fp32_matches_the_cpu(tmp_path, base):
    hf_model(base).save_pretrained(tmp_path)
    ref = ResolvedModel("tiny", "folder", tmp_path)
    cpu = load_resolved(ref, dtype="float32", device="cpu", with_tokenizer=False).model
    gpu = load_resolved(ref, dtype="float32", device="cuda", with_tokenizer=False).model
    runner = make_runner(gpu)
    assert isinstance(runner, TorchRunner) and runner.description == "PyTorch layers: on cuda"
    prompts = [[5, 9, 11, 3, 7, 8, 21], [17, 2, 30]]
    a, b = greedy(cpu, prompts), greedy(gpu, prompts)
    for x, y in zip(a, b):
        assert x.generated == y.generated
        for p, q in zip(x.logits, y.logits):
            assert (p - q.cpu()).abs().max().item() < 1e-3  # TF32 / other kernels: close, not bitwise


def test_auto_dtype_on_cuda_is_16_bit(tmp_path):
    hf_model(LLAMA_BASE).save_pretrained(tmp_path)
    loaded = load_resolved(ResolvedModel("tiny", "folder", tmp_path), device="cuda", with_tokenizer=False)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert loaded.dtype == want and next(loaded.model.parameters()).device.type == "cuda"
    assert len(greedy(loaded.model, [[5, 9, 11]])[0].generated) == 12


def test_quantize_on_mps_or_cpu_only_schemes_are_clear():
    from tests.cli_util import run_llm

    r = run_llm("generate", "--device", "cpu", "--quantize", "float8", "hi")
    assert r.returncode == 1 and b"float8 needs a CUDA GPU" in r.stderr


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "llm-int8"])
def test_quantized_on_cuda_through_torchao_or_bitsandbytes(tmp_path, scheme):
    """The backends made for CUDA quantize the model where it lies; greedy decode stays close to bf16's."""
    from llm_torch.quant.api import quantize_loaded
    from llm_torch.quant.spec import make_spec

    if scheme in ("int8", "int4"):
        pytest.importorskip("torchao")
    cfg = config_dict(LLAMA_BASE, dict(hidden_size=256, intermediate_size=512))  # int4 wants K % 128 == 0
    hf_model(cfg).save_pretrained(tmp_path)
    ref = ResolvedModel("tiny", "folder", tmp_path)
    base = load_resolved(ref, dtype="bfloat16", device="cuda", with_tokenizer=False)
    quant = load_resolved(ref, dtype="bfloat16", device="cuda", with_tokenizer=False)
    quantize_loaded(quant, make_spec(scheme, cuda=True))
    a, b = greedy(base.model, [[5, 9, 11, 3]])[0], greedy(quant.model, [[5, 9, 11, 3]])[0]
    assert len(b.generated) == 12
    rel = (a.logits[0].float() - b.logits[0].float()).abs().max() / a.logits[0].float().abs().max()
    assert rel < 0.2
