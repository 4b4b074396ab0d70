"""Special and added tokens: which names transformers' tokenizer classes make special, adding them whole-match,
the BOS/EOS post-processor, and the byte-fallback ids a streaming decode must hold back."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

# Token names the tokenizer class transformers instantiates treats as special whenever the vocab has them.
CLASS_SPECIALS = {
    "GPT2Tokenizer": ("<|endoftext|>",),
    "LlamaTokenizer": ("<unk>", "<s>", "</s>"),
    "GemmaTokenizer": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"),
}


def add_tokens(backend: Backend, names: Iterable[str], special: bool) -> None:
    """Add `names` as whole-match tokens unless already added (transformers keeps the first flag)."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    fresh = [AddedToken(n, special=special, normalized=False) for n in dict.fromkeys(names) if n not in added]
    (backend.add_special_tokens if special else backend.add_tokens)(fresh)


def bos_eos_processor(backend: Backend, bos: int | None, eos: int | None, add_bos: bool, add_eos: bool):
    """transformers' update_post_processor: BOS/EOS around each sequence; a flag without its token is off."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    b = backend.id_to_token(bos) if add_bos else ""
    e = backend.id_to_token(eos) if add_eos else ""
    single = f"{b + ':0 ' if b else ''}$A:0{' ' + e + ':0' if e else ''}"
    pair = f"{single}{' ' + b + ':1' if b else ''} $B:1{' ' + e + ':1' if e else ''}"
    specials = ([(b, bos)] if b else []) + ([(e, eos)] if e and e != b else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def special_ids(backend: Backend) -> frozenset[int]:
    """Ids of the added tokens marked special (what skip_special_tokens drops)."""
    return frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)


def byte_fallback_ids(backend: Backend) -> frozenset[int]:
    """Ids of <0xNN> tokens, when the decoder assembles them into characters (ByteFallback)."""
    decoder = backend.decoder
    if decoder is None or decoder.decode(["<0xE4>", "<0xB8>", "<0xAD>"]) != "\u4e2d":
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)
