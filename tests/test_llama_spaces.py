"""LlamaTokenizer's `legacy` and `add_prefix_space` against transformers, on the real LLaMA vocabulary
(tests/llama_spm.py fetches it; skipped without it) and always on the tiny sentencepiece vocabulary
test_tokenizer.py trains. The reference folder is laid out as Llama 2's Hub repos are: a tokenizer.json with
the legacy Prepend + Replace normalizer and a tokenizer_config.json naming LlamaTokenizerFast, so transformers
rebuilds the pipeline from the options, as it does for those repos.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm_torch.cli.app import app
from llm_torch.core.errors import TokenizerError
from llm_torch.core.tokenizer import StreamingDetokenizer, Tokenizer
from tests.cli_util import run_llm
from tests.llama_spm import llama_spm_gguf
from tests.test_tokenizer import departs_from_sentencepiece, gemma_vocab, gguf_metadata, llama_vocab, smol  # noqa: F401 (fixtures)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "<s>[INST] Hi there [/INST]",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhy? [/INST] Because. </s><s>[INST] And? [/INST]",
    " Hello",
    "  two leading spaces",
    "Hello\n<s>there",
    "a</s>b c",
    "日本語 😀 ünïcödé",
    "",
    " ",
]
OPTIONS = [None, False, True]


def llama2_folder(ref, folder: Path, **config) -> Path:
    """`ref` (a transformers tokenizer of a sentencepiece vocabulary) saved as Llama 2's repos lay it out;
    `config` entries that are not None go into tokenizer_config.json."""
    ref.save_pretrained(folder)
    tokenizer_file = folder / "tokenizer.json"
    data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["pre_tokenizer"] = None
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    settings = json.loads(config_file.read_text(encoding="utf-8"))
    settings.pop("backend", None)
    settings["tokenizer_class"] = "LlamaTokenizerFast"
    settings.update({k: v for k, v in config.items() if v is not None})
    config_file.write_text(json.dumps(settings), encoding="utf-8")
    return folder


def assert_same(ours: Tokenizer, ref, texts=TEXTS) -> None:
    """ours == transformers, except where transformers 5 departs from sentencepiece: a text that starts with a
    space keeps sentencepiece's dummy prefix (" Hello" -> "▁▁Hello"), as Llama 2's own tokenizer.json gives it."""
    sentencepiece = sentencepiece_reference(ref)
    for text in texts:
        ids = ours.encode(text)
        expected = sentencepiece if departs_from_sentencepiece(ours, text) else ref
        assert ids == expected(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == expected(text, add_special_tokens=False)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def sentencepiece_reference(ref):
    """Llama 2's tokenizer.json run as it is (Prepend + Replace normalizer: sentencepiece's spacing, which
    transformers 4 used) over `ref`'s vocabulary, called like a transformers tokenizer."""
    from tokenizers import Tokenizer as Raw, normalizers

    raw = Raw.from_str(ref.backend_tokenizer.to_str())
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    raw.pre_tokenizer = None
    return lambda text, add_special_tokens=True: {"input_ids": raw.encode(text, add_special_tokens=add_special_tokens).ids}


def llm(*args: str):
    result = CliRunner().invoke(app, list(args), env={"NO_COLOR": "1"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ---- the real LLaMA vocabulary ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_llama(tmp_path_factory):
    path, why = llama_spm_gguf()
    if path is None:
        pytest.skip(why)
    meta = gguf_metadata(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return meta, ref, llama2_folder(ref, tmp_path_factory.mktemp("llama2") / "plain")


def test_real_llama_inst_ids(real_llama):
    meta, _, folder = real_llama
    # Llama 2 chat's "<s>[INST]": "[" (29961) after BOS by default, "▁[" (518) with legacy=True.
    assert Tokenizer.from_gguf_metadata(meta).encode("<s>[INST]") == [1, 1, 29961, 25580, 29962]
    assert Tokenizer.from_folder(folder).encode("<s>[INST]") == [1, 1, 29961, 25580, 29962]
    assert Tokenizer.from_folder(folder, legacy=True).encode("<s>[INST]") == [1, 1, 518, 25580, 29962]
    # sentencepiece keeps its dummy prefix before a leading space (transformers 5 gives [1, 2646, 1327, 287]):
    # llama-tokenizer-js's cases, taken from sentencepiece, and transformers 4.57's LlamaTokenizerFast.
    for legacy in (False, True):
        assert Tokenizer.from_folder(folder, legacy=legacy).encode(" grabbed") == [1, 29871, 2646, 1327, 287]
        assert Tokenizer.from_gguf_metadata(meta, legacy=legacy).encode(" " * 11 + "grabbed") == [1, 9651, 2646, 1327, 287]
    assert Tokenizer.from_folder(folder).encode(" Hello") == [1, 29871, 15043]
    assert Tokenizer.from_folder(folder).encode("Hello") == [1, 15043]
    assert Tokenizer.from_folder(folder, add_prefix_space=False).encode("Hello") == [1, 10994]


@pytest.mark.parametrize("legacy", OPTIONS)
@pytest.mark.parametrize("add_prefix_space", OPTIONS)
def test_real_llama_options_match_transformers(real_llama, tmp_path, legacy, add_prefix_space):
    meta, ref_gguf, folder = real_llama
    # From tokenizer_config.json ...
    configured = llama2_folder(ref_gguf, tmp_path, legacy=legacy, add_prefix_space=add_prefix_space)
    ref = transformers.AutoTokenizer.from_pretrained(str(configured))
    ours = Tokenizer.from_folder(configured)
    assert_same(ours, ref)
    assert (ours.legacy, ours.add_prefix_space) == (bool(legacy), add_prefix_space is not False)
    # ... and as overrides, like from_pretrained(..., legacy=..., add_prefix_space=...).
    given = {k: v for k, v in (("legacy", legacy), ("add_prefix_space", add_prefix_space)) if v is not None}
    ref = transformers.AutoTokenizer.from_pretrained(str(folder), **given)
    assert_same(Tokenizer.from_folder(folder, **given), ref)
    assert_same(Tokenizer.from_gguf_metadata(meta, **given), ref)
    overridden = Tokenizer.from_folder(configured)
    overridden.override_spaces(legacy=not legacy, add_prefix_space=add_prefix_space is False)
    overridden.override_spaces(**given)
    if len(given) == 2:
        assert_same(overridden, ref)


def test_real_llama_cli(real_llama):
    _, _, folder = real_llama

    def ids(*flags):
        out = llm("tokenize", str(folder), "<s>[INST] Hi", "-f", "json", *flags)
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["ids"]

    assert ids() == ids("--no-legacy") == [1, 1, 29961, 25580, 29962, 6324]
    assert ids("--legacy") == [1, 1, 518, 25580, 29962, 6324]
    assert ids("--no-add-prefix-space") == ids("--legacy", "--no-add-prefix-space") == [1, 1, 29961, 25580, 29962, 6324]
    assert ids("--no-special") == [1, 29961, 25580, 29962, 6324]  # the text's own "<s>" stays special, no BOS added
    bare = json.loads(llm("tokenize", str(folder), "Hi", "-f", "json", "--no-add-prefix-space").stdout)["tokens"]
    assert bare == ["<s>", "Hi"]
    assert json.loads(llm("tokenize", str(folder), "Hi", "-f", "json").stdout)["tokens"] == ["<s>", "\u2581Hi"]
    out = llm("tokenize", str(folder), "--decode", "1,15043,2,1,3186", "--no-special")
    assert out.stdout == "Hello world\n"
    assert llm("tokenize", str(folder), "--decode", "1,15043,2").stdout == "<s> Hello</s>\n"


def test_real_llama_streaming_skips_specials(real_llama):
    meta, ref, _ = real_llama
    ours = Tokenizer.from_gguf_metadata(meta)
    ids = ours.encode("Hello") + [2, 1] + ours.encode("world", add_special_tokens=False) + [2]
    detok = StreamingDetokenizer(ours, skip_special_tokens=True)
    text = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert text == ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert "<s>" not in text and "</s>" not in text


# ---- always on: the tiny sentencepiece vocabulary ---------------------------------------------------


@pytest.mark.parametrize("legacy", OPTIONS)
@pytest.mark.parametrize("add_prefix_space", OPTIONS)
def test_tiny_vocab_options_match_transformers(llama_vocab, tmp_path, legacy, add_prefix_space):  # noqa: F811
    _, ref_gguf, _, meta = llama_vocab
    configured = llama2_folder(ref_gguf, tmp_path / "configured", legacy=legacy, add_prefix_space=add_prefix_space)
    assert_same(Tokenizer.from_folder(configured), transformers.AutoTokenizer.from_pretrained(str(configured)))
    given = {k: v for k, v in (("legacy", legacy), ("add_prefix_space", add_prefix_space)) if v is not None}
    plain = llama2_folder(ref_gguf, tmp_path / "plain")
    ref = transformers.AutoTokenizer.from_pretrained(str(plain), **given)
    assert_same(Tokenizer.from_folder(plain, **given), ref)
    assert_same(Tokenizer.from_gguf_metadata(meta, **given), ref)


def test_tiny_vocab_options_change_the_ids(llama_vocab, tmp_path):  # noqa: F811
    """The settings differ where they should, so the comparisons above can fail."""
    meta = llama_vocab[3]
    default, legacy = Tokenizer.from_gguf_metadata(meta), Tokenizer.from_gguf_metadata(meta, legacy=True)
    bare = Tokenizer.from_gguf_metadata(meta, add_prefix_space=False)
    assert default.encode("<s>Hello") != legacy.encode("<s>Hello")
    assert default.encode("Hello", add_special_tokens=False) != bare.encode("Hello", add_special_tokens=False)
    assert default.encode("Hello") == legacy.encode("Hello")  # only what follows a special token differs
    folder = llama2_folder(llama_vocab[1], tmp_path)
    out = llm("tokenize", str(folder), "<s>Hello", "-f", "json", "--legacy")
    assert json.loads(out.stdout)["ids"] == legacy.encode("<s>Hello")


def test_options_need_a_llama_tokenizer(smol, gemma_vocab, tmp_path):  # noqa: F811
    ours_smol, ref_smol = smol
    with pytest.raises(TokenizerError, match="LlamaTokenizer"):
        ours_smol.override_spaces(legacy=True)
    with pytest.raises(TokenizerError, match="GemmaTokenizer"):
        Tokenizer.from_gguf_metadata(gemma_vocab[3], add_prefix_space=False)
    assert ours_smol.legacy is None and gemma_vocab[0].add_prefix_space is None
    # A byte-level tokenizer.json that names LlamaTokenizer (Llama 3 repos) is read as it is, as transformers does.
    ref_smol.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "LlamaTokenizerFast"}))
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.legacy is None
    assert_same(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path)), ["Hello world", " 2024 <|im_end|>"])
    with pytest.raises(TokenizerError, match="LlamaTokenizer"):
        Tokenizer.from_folder(tmp_path, legacy=False)
    r = run_llm("tokenize", str(tmp_path), "hi", "--legacy")
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "LlamaTokenizer" in err and len(err.splitlines()) == 1, err
