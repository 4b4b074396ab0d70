"""--device-map auto (core/placement/device_map.py): the planner on made-up device lists places layers as documented
and refuses what fits nowhere, and a mapped model generates what the unmapped one does."""

from __future__ import annotations

import pytest
import torch

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.placement.device_map import DeviceBudget, plan
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.errors import ResourceError
from llm_torch.core.engine.spec import GenerationSpec
from llm_torch.core.placement.loading import ResolvedModel, load_resolved
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model

# Llama-2-7B's shape: 32 layers of 202 M parameters (404 MB in fp16) + a 131 M-parameter embedding and head.
LLAMA2_7B = dict(LLAMA_BASE, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
GB = 10**9


def test_layers_fill_the_gpus_in_order_then_the_cpu():
    config = ModelConfig.from_dict(LLAMA2_7B)
    budgets = [DeviceBudget("cuda:0", 6 * GB), DeviceBudget("cuda:1", 6 * GB), DeviceBudget("cpu", 64 * GB)]
    p = plan(config, torch.float16, budgets, context=1024)
    # Per layer: 405 MB of weights + 2 x 1024 x 4096 x 2 bytes = 16.8 MB of KV, against 90% of 6 GB: the
    # 262 MB embedding and 12 layers on GPU 0, 12 on GPU 1, the last 8 and the head on the CPU (f16 KV there too:
    # --kv-cache auto keeps a 16-bit model's keys in 16 bits on the CPU).
    assert p.embed == "cuda:0" and p.head == "cpu"
    assert p.layers == ["cuda:0"] * 12 + ["cuda:1"] * 12 + ["cpu"] * 8
    assert p.kv["cpu"] == 8 * 2 * 1024 * 4096 * 2 and p.kv["cuda:0"] == 12 * 2 * 1024 * 4096 * 2
    assert p.device_of("model.layers.12.mlp.down_proj.weight") == "cuda:1" and p.device_of("lm_head.weight") == "cpu"
    text = "\n".join(p.lines())
    assert "cuda:0: layers 0-11, embedding:" in text and "cpu: layers 24-31, norm + head:" in text


def test_a_model_that_fits_nowhere_is_refused_with_the_numbers():
    config = ModelConfig.from_dict(LLAMA2_7B)
    with pytest.raises(ResourceError, match=r"does not fit: layer \d+ finds no room; it needs ~13\.\d GiB .* "
                                            r"\(cuda:0 3\.7, cpu 7\.5\)"):
        plan(config, torch.float16, [DeviceBudget("cuda:0", 4 * GB), DeviceBudget("cpu", 8 * GB)], context=1024)


def test_tied_head_stays_with_the_embedding_and_windows_bound_the_kv():
    config = ModelConfig.from_dict(dict(GEMMA2_BASE, num_hidden_layers=4, tie_word_embeddings=True))
    p = plan(config, torch.float32, [DeviceBudget("cpu", 10 * GB)], context=128)
    assert p.head == p.embed == "cpu"
    kv_rows = config.num_key_value_heads * config.head_dim
    windows = [min(128, config.sliding_window + 256) if t == "sliding_attention" else 128 for t in config.layer_types]
    assert p.kv["cpu"] == sum(2 * kv_rows * n * 4 for n in windows)


@pytest.mark.parametrize("base", [config_dict(LLAMA_BASE, dict(num_key_value_heads=2)), GEMMA2_BASE],
                         ids=["llama-gqa", "gemma2"])
def test_a_mapped_model_generates_what_the_plain_one_does(tmp_path, base):
    """All 'devices' are the CPU here: the hooks, the per-layer KV placement and the runner still run."""
    hf_model(base).save_pretrained(tmp_path)
    ref = ResolvedModel("tiny", "folder", tmp_path)
    plain = load_resolved(ref, dtype="float32", device="cpu", with_tokenizer=False)
    mapped = load_resolved(ref, dtype="float32", with_tokenizer=False, device_map="auto",
                           budgets=[DeviceBudget("cpu", 10 * GB)])
    assert mapped.device_plan.layers == ["cpu"] * base["num_hidden_layers"]
    spec = GenerationSpec(max_new_tokens=10, eos_token_ids=())

    def tokens(model):
        engine = Engine(model, None, EngineConfig(max_batch=2))
        reqs = [engine.add(p, spec) for p in ([5, 9, 11, 3, 7, 8, 21], [17, 2, 30])]
        while engine.has_work():
            engine.step()
        return [r.generated for r in reqs], engine.runner.description

    got, description = tokens(mapped.model)
    assert description.startswith("PyTorch layers: device map: layers over cpu")
    assert got == tokens(plain.model)[0]


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    from tests.cli_util import run_llm

    hf_model(LLAMA_BASE).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # a dry run must not open the weights
    r = run_llm("generate", "-m", str(tmp_path), "--device-map", "auto", "--dry-run", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert out[0].endswith("(float32 weights):") and out[1].startswith("cpu: layers 0-1, embedding, norm + head: ")
    assert "GiB KV for 128 tokens" in out[1]
    bad = run_llm("generate", "-m", str(tmp_path), "--device-map", "balanced", "--dry-run")
    assert bad.returncode == 1 and "unknown device map 'balanced'" in bad.stderr.decode()


def test_the_plan_counts_every_parameter_the_model_has():
    """Biases, norms and a tied head as the built model holds them (core/placement/sizing.py), and the
    same totals as the one-device memory estimate."""
    from llm_torch.core.model.model import CausalLM
    from llm_torch.core.placement.memory import estimate

    for extra in ({}, dict(attention_bias=True, mlp_bias=True), dict(tie_word_embeddings=True)):
        config = ModelConfig.from_dict(dict(LLAMA_BASE, **extra))
        with torch.device("meta"):
            params = sum(p.numel() for p in CausalLM(config).parameters())
        p = plan(config, torch.float32, [DeviceBudget("cpu", 10 * GB)], context=64)
        assert sum(p.weights.values()) == 4 * params
        assert (sum(p.weights.values()), sum(p.kv.values())) == estimate(config, torch.float32, torch.device("cpu"), 64)
