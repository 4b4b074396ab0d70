"""benchmarks/vs_llamacpp.py's own logic, without llama.cpp: parsing each tool's output, the paired ratios,
and the random model it writes (byte-level vocabulary with merges, GQA shapes) as `llm convert` turns it
into GGUF. No timings are asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.cli_util import run_llm
from tests.test_bench import write_tiny_folder

_spec = importlib.util.spec_from_file_location("vs_llamacpp", Path(__file__).parent.parent / "benchmarks" / "vs_llamacpp.py")
vs = importlib.util.module_from_spec(_spec)
sys.modules["vs_llamacpp"] = vs  # its dataclasses look their module up there
_spec.loader.exec_module(vs)


def _bench_row(n_prompt: int, n_gen: int, ts: float) -> dict:
    # The fields of one llama-bench -o json record that the script reads, among others it ignores.
    return {"model_type": "llama 1B Q4_0", "n_threads": 2, "n_prompt": n_prompt, "n_gen": n_gen,
            "avg_ns": 1, "avg_ts": ts, "samples_ts": [ts]}


def test_llama_bench_json_names_tests_as_llama_bench_does():
    text = json.dumps([_bench_row(128, 0, 250.5), _bench_row(512, 0, 200.0), _bench_row(0, 128, 20.25),
                       _bench_row(512, 128, 30.0)])
    assert vs.parse_llama_bench(text) == {"pp128": 250.5, "pp512": 200.0, "tg128": 20.25, "pp512+tg128": 30.0}


def test_batched_bench_jsonl_gives_aggregate_decode_speed_per_batch():
    text = "\n".join([
        "main: some log line that is not JSON",
        json.dumps({"pp": 16, "tg": 32, "pl": 1, "speed_pp": 90.0, "speed_tg": 10.5, "speed": 12.0}),
        json.dumps({"pp": 16, "tg": 32, "pl": 8, "speed_pp": 95.0, "speed_tg": 60.0, "speed": 61.0}),
        ""])
    assert vs.parse_batched_bench(text) == {"batch1": 10.5, "batch8": 60.0}


def test_our_bench_json_parses_into_the_same_names(tmp_path):
    write_tiny_folder(tmp_path)
    r = run_llm("bench", "-m", str(tmp_path), "--dtype", "float32", "-p", "8,16", "-n", "3", "-b", "1,2",
                "-r", "1", "-t", "1", "-f", "json")
    assert r.returncode == 0, r.stderr.decode()
    got = vs.parse_ours_bench(vs.last_json(r.stdout.decode()))
    assert set(got) == {"pp8", "pp16", "tg3", "batch1", "batch2"}
    assert all(v > 0 for v in got.values())


def test_ratio_is_the_median_of_paired_ratios_and_skips_missing_runs():
    figs = vs.Figures()
    for ours, theirs in [(10.0, 5.0), (12.0, 4.0), (9.0, 9.0), (None, 3.0)]:
        figs.add("m", "tg128", "tok/s", ours, theirs)
    figs.add("m", "peak RSS (server)", "MiB", 300.0, 100.0)
    figs.add("m", "never paired", "s", 1.0, None)
    rows = figs.rows()
    assert [r["test"] for r in rows] == ["tg128", "peak RSS (server)"]
    tg = rows[0]
    assert tg["runs_ours"] == [10.0, 12.0, 9.0] and tg["runs_llama_cpp"] == [5.0, 4.0, 9.0]
    assert tg["ours"] == 10.0 and tg["llama_cpp"] == 5.0
    assert tg["ratio"] == 2.0  # median of 2, 3, 1: not 10 / 5 by chance alone
    figs.add("m", "tg128", "tok/s", 10.0, 1.0)  # ratios 1, 2, 3, 10 -> 2.5; medians 10 / 4.5
    assert figs.rows()[0]["ratio"] == pytest.approx(2.5)
    table = vs.markdown(figs.rows()).splitlines()
    assert table[2] == "| m | tg128 | tok/s (higher is better) | 10.0 | 4.5 | 2.50 | 4 |"
    assert table[3] == "| m | peak RSS (server) | MiB (lower is better) | 300 | 100 | 3.00 | 1 |"


def test_random_model_converts_to_a_gguf_llama_cpp_accepts(tmp_path):
    """The 1.1B recipe on a small config: GQA shapes as configured, and a byte-level vocabulary with merges
    (llama.cpp refuses a gpt2 vocabulary without them) that tokenizes any text."""
    gguf = pytest.importorskip("gguf")
    config = dict(vs.TINYLLAMA_SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    folder = tmp_path / "hf"
    vs.make_random_hf(folder, config)
    out = tmp_path / "m.gguf"
    r = run_llm("convert", str(folder), "--to", "gguf", "--outtype", "q8_0", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr.decode()
    reader = gguf.GGUFReader(out)
    fields = reader.fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].data) == 1
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_k.weight"] == (128, 32)  # ne order: input, output (2 KV heads of 16)
    assert shapes["blk.1.ffn_down.weight"] == (256, 128)
    r = run_llm("tokenize", "-m", str(out), "héllo to you")
    assert r.returncode == 0, r.stderr.decode()
