"""`llm bench` through a real subprocess on a tiny random model: output shapes, never timings.

Speed is measured by `llm bench` itself and benchmarks/compare.py, not asserted in tests.
"""

import json
import re

import pytest
import torch

from llm_torch.core.tools.bench import random_prompt
from llm_torch.core.tools.bench_results import BenchSpec, Stat
from llm_torch.core.tools.model_size import weight_bytes_per_token, weights_bytes
from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import InputError
from llm_torch.core.model.model import CausalLM
from tests.cli_util import run_llm, run_llm_on_terminal
from tests.tiny import LLAMA_BASE, config_dict

VOCAB = LLAMA_BASE["vocab_size"]
CONTEXT = LLAMA_BASE["max_position_embeddings"]


def write_tiny_folder(folder, **overrides) -> dict:
    """config.json + random safetensors + a word-level tokenizer.json: a loadable HF-style folder."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    cfg = config_dict(LLAMA_BASE, overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(cfg))
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}  # tied head listed once
    save_file(tensors, str(folder / "model.safetensors"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<pad>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return cfg


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-tiny")
    write_tiny_folder(folder)
    return folder


def test_json_schema_and_repetitions(tiny_folder):
    r = run_llm("bench", "-m", str(tiny_folder), "--dtype", "float32", "--prompt-lengths", "8,16",
                "--new-tokens", "4", "--repetitions", "2", "--threads", "1", "--format", "json")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stderr == b""  # progress is shown only on a terminal
    out = json.loads(r.stdout)
    assert set(out) >= {"model", "threads", "repetitions", "warmup", "load", "prefill", "decode", "peak_rss_bytes",
                        "peak_rss_mib", "memory_bandwidth", "decode_ceiling_tokens_per_second",
                        "decode_fraction_of_ceiling", "environment"}
    assert out["threads"] == 1 and out["repetitions"] == 2 and out["warmup"] == 1
    m = out["model"]
    assert m["dtype"] == "float32" and m["device"] == "cpu"
    assert m["params"] == sum(p.numel() for p in CausalLM(ModelConfig.from_dict(LLAMA_BASE)).parameters())
    assert m["weights_bytes"] == 4 * m["params"]
    # Untied: the embedding lookup reads one row, not the table.
    hidden = LLAMA_BASE["hidden_size"]
    assert m["bytes_per_token"] == m["weights_bytes"] - 4 * (VOCAB - 1) * hidden
    assert out["load"]["seconds"] > 0
    assert [p["prompt_tokens"] for p in out["prefill"]] == [8, 16]
    for stat in [p["tokens_per_second"] for p in out["prefill"]] + [out["decode"]["tokens_per_second"]]:
        assert len(stat["runs"]) == 2
        assert stat["min"] <= stat["median"] <= stat["max"] and stat["min"] > 0
    assert out["decode"]["new_tokens"] == 4 and out["decode"]["prompt_tokens"] == 1
    assert out["peak_rss_bytes"] > 0 and out["peak_rss_mib"] > 0
    assert out["memory_bandwidth"]["read_gb_per_s"] > 0 and out["memory_bandwidth"]["threads"] == 1
    assert out["decode_ceiling_tokens_per_second"] > 0 and out["decode_fraction_of_ceiling"] > 0


def test_batched_decode_rows(tiny_folder):
    r = run_llm("bench", "-m", str(tiny_folder), "--dtype", "float32", "-p", "", "-n", "3", "-r", "1", "-t", "1",
                "--batch", "1,3", "--format", "json")
    assert r.returncode == 0, r.stderr.decode()
    rows = json.loads(r.stdout)["batched_decode"]
    assert [(b["batch"], b["new_tokens"], b["prompt_tokens"]) for b in rows] == [(1, 3, 16), (3, 3, 16)]
    for b in rows:
        agg, per = b["tokens_per_second"]["median"], b["per_sequence_tokens_per_second"]["median"]
        assert agg == pytest.approx(b["batch"] * per, rel=1e-3) and per > 0
    bad = run_llm("bench", "-m", str(tiny_folder), "--batch", "0")
    assert bad.returncode != 0 and bad.stderr.decode().startswith("error: --batch values must be >= 1")


def test_plain_table_when_piped(tiny_folder):
    r = run_llm("bench", "-m", str(tiny_folder), "-p", "8", "-n", "3", "-r", "1", "-t", "1")
    assert r.returncode == 0, r.stderr.decode()
    text = r.stdout.decode()
    assert "\x1b[" not in text  # no colour or box drawing on a pipe
    lines = text.splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert cells[0] == ["model", "dtype", "size", "params", "device", "threads", "test", "t/s", "min", "max"]
    assert [row[6] for row in cells[2:]] == ["pp8", "tg3"]
    assert all(float(row[7]) > 0 for row in cells[2:])
    assert any(line.startswith("peak RSS:") for line in lines)
    assert any(line.startswith("decode ceiling:") for line in lines)


def test_prompt_longer_than_context_is_one_line_error(tiny_folder):
    r = run_llm("bench", "-m", str(tiny_folder), "-p", str(CONTEXT), "-n", "2", "-r", "1", "-t", "1")
    assert r.returncode != 0
    err = r.stderr.decode().strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "context" in err
    assert r.stdout == b""


def test_bad_prompt_lengths_flag():
    r = run_llm("bench", "-p", "128,abc")
    assert r.returncode != 0 and r.stderr.decode().startswith("error:")


def test_tied_head_counts_the_table_once(tmp_path):
    cfg = config_dict(LLAMA_BASE, {"tie_word_embeddings": True})
    model = CausalLM(ModelConfig.from_dict(cfg))
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert weights_bytes(model) == 4 * n
    assert weight_bytes_per_token(model) == 4 * n  # the head reads the whole shared table


def test_spec_and_helpers():
    with pytest.raises(InputError):
        BenchSpec(repetitions=0)
    with pytest.raises(InputError):
        BenchSpec(prompt_lengths=(0,))
    s = Stat.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)
    ids = random_prompt(VOCAB, 32, seed=1)
    assert ids == random_prompt(VOCAB, 32, seed=1) and len(ids) == 32 and all(3 <= i < VOCAB for i in ids)


def test_progress_on_a_terminal_only(tiny_folder):
    """On a terminal stderr shows the runs done, their rate and the ETA; piped, stderr stays empty."""
    args = ("bench", "-m", str(tiny_folder), "--dtype", "float32", "-p", "8,16", "-n", "4", "-r", "2", "-t", "1",
            "--format", "json")
    code, shown, out = run_llm_on_terminal(*args)
    assert code == 0, shown
    assert re.search(r"benchmarking .*[\d,]+/[\d,]+ runs .*runs/s .*eta", shown), shown
    assert json.loads(out)["model"]  # the result still on stdout
    piped = run_llm(*args)
    assert piped.returncode == 0 and piped.stderr == b""
