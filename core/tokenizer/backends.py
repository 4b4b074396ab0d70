"""`tokenizers` pipelines (model, normalizer, pre-tokenizer, decoder) built the way transformers builds them:
byte-level BPE (GPT2Tokenizer), sentencepiece BPE as LlamaTokenizer (with its `legacy` / `add_prefix_space`
options) and as GemmaTokenizer, plus the merges a vocabulary implies."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from llm_torch.core.errors import TokenizerError

SPACE = "\u2581"  # sentencepiece's visible space
# Byte-level files name the regex their merges were learned with; unnamed ones get GPT-2's (ByteLevel's own).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe"), _LLAMA3_SPLIT)
# Pre-tokenizer names llama.cpp reads as "each digit alone, then GPT-2's regex" (SmolLM2's own
# tokenizer.json: Digits(individual_digits) + ByteLevel). transformers' GGUF loader ignores the name
# and would merge "2024" into multi-digit tokens the model never saw in training.
_GGUF_DIGIT_SPLITS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of bytes: printable Latin-1 bytes are themselves, the rest take
    U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(0x100 + n)
    return table


def _check_merges(merges: list[tuple], vocab: dict[str, int]) -> None:
    # tokenizers panics (an uncatchable-looking PanicException) on a merge whose pieces are not tokens.
    for pair in merges:
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise TokenizerError(f"GGUF merge {' '.join(pair)!r} does not join two tokens into a token",
                                 hint="the file's tokenizer.ggml.merges is corrupt")


def byte_level_backend(tokens: list[str], merges: list[tuple] | None, pre: str | None) -> tuple[Backend, list[str]]:
    """GPT2Tokenizer's pipeline for a GGUF `gpt2` vocabulary; also returns the tokens as respelled."""
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # Some files store a token as raw UTF-8 text; transformers respells it in the byte alphabet.
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        _check_merges(merges, vocab)
    model = BPE(vocab=vocab, merges=merges if merges is not None else derive_merges(vocab, None),
                dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = Backend(model)
    split = _GGUF_SPLITS.get(pre)
    if pre in _GGUF_DIGIT_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    elif split is None:  # unknown/absent pre-tokenizer name: ByteLevel's GPT-2 regex, as in transformers
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, tokens


def sentencepiece_backend(tokens: list[str], merges: list[tuple] | None, scores: Sequence[float] | None,
                          tokenizer_class: str) -> tuple[Backend, list[str]]:
    """The BPE model of a GGUF `llama` (sentencepiece) vocabulary, with GemmaTokenizer's pipeline for
    tokenizer_class "GemmaTokenizer"; a LlamaTokenizer one gets its pipeline from set_llama_spaces."""
    gemma = tokenizer_class == "GemmaTokenizer"
    if gemma:
        # Gemma files store whitespace-only tokens as real spaces, looked up as "▁" runs; and their
        # scores do not follow merge order, the file order does.
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = {t: -i for i, t in enumerate(tokens)}
    elif scores is not None:
        ranks = dict(zip(tokens, scores))
    elif merges is None:
        raise TokenizerError("GGUF sentencepiece vocabulary has neither merges nor scores",
                             hint="the file's tokenizer metadata is incomplete")
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
        merges = derive_merges(vocab, ranks)
    else:
        _check_merges(merges, vocab)
    unk = "<unk>" if gemma and "<unk>" in vocab else None  # GemmaTokenizer names an unk token, Llama's does not
    backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None, unk_token=unk))
    if gemma:  # no prefix space: spaces become "▁" and nothing else
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend, tokens


def set_llama_spaces(backend: Backend, legacy: bool, add_prefix_space: bool) -> None:
    """Give `backend` LlamaTokenizer's pipeline for these options (its model is kept), spaced as sentencepiece.

    add_prefix_space puts sentencepiece's dummy "▁" before the text; legacy=False (transformers' default) only
    before the first piece of it, legacy=True also after every special token, so "<s>[INST]" becomes <s> "▁["
    (id 518 in Llama 2) instead of <s> "[" (29961). Decoding strips the one space the prefix added.

    sentencepiece adds the dummy prefix even when the text already starts with a space (" grabbed" -> "▁▁grabbed",
    ids 29871 2646 ... in Llama 2, as transformers 4 also gave); transformers 5's Metaspace skips it then. We
    follow sentencepiece, the tokenizer the models were trained with: legacy=True prepends in the normalizer
    (Llama 2's own tokenizer.json), and Tokenizer.encode adds the one "▁" Metaspace's "first" scheme skips
    (skips_dummy_prefix).
    """
    backend.normalizer = None  # LlamaTokenizer drops the file's normalizer (Llama 2's Prepend + Replace)
    if add_prefix_space and legacy:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        backend.pre_tokenizer = None
    else:
        scheme = "first" if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)


def skips_dummy_prefix(backend: Backend) -> bool:
    """Does `backend` prepend with Metaspace's "first" scheme, which skips sentencepiece's dummy prefix before a
    leading space? Our LlamaTokenizer rebuild does, and so do tokenizer.json files transformers 5 writes for
    sentencepiece vocabularies (and Mistral-style repos): Tokenizer.encode adds that "▁" back."""
    pre = backend.pre_tokenizer
    return isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first"


def derive_merges(vocab: dict[str, int], ranks: dict[str, float] | None) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: every split of a token into two tokens, best first.

    With `ranks` (sentencepiece scores), higher-scored results merge first, ties going to the longer left
    then right piece; without, lower ids merge first. This is the order transformers derives.
    """
    found = []
    for piece, rank in (ranks if ranks is not None else vocab).items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((rank, left, right) for left, right in pairs)
    if ranks is not None:
        found.sort(key=lambda m: (-m[0], -len(m[1]), -len(m[2])))
    else:
        found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
    return [(left, right) for _, left, right in found]
