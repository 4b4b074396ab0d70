"""Tokenizers for Llama / Llama 2 / Gemma 2 style checkpoints, chat templates and streaming detokenization.

Two sources: a Hugging Face folder (`tokenizer.json` + configs) or a GGUF file's metadata. A GGUF carries
only the vocabulary, so the `tokenizers` pipeline is rebuilt here the way transformers rebuilds it
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), which is the reference every test compares against.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .errors import TokenizerError

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4
# Architectures whose `llama` (sentencepiece) vocabulary transformers builds with GemmaTokenizer's pipeline.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# Token names the tokenizer class transformers instantiates treats as special whenever the vocab has them.
_CLASS_SPECIALS = {
    "gpt2": ("<|endoftext|>",),
    "llama": ("<unk>", "<s>", "</s>"),
    "gemma": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"),
}
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
_REPLACEMENT = "\ufffd"
# Tokenizer classes transformers pads on the left (their class default padding_side), which also puts
# the context before the question in its question-answering pipeline (qa.py).
_LEFT_PADDING_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                         "GemmaTokenizer", "GemmaTokenizerFast")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids, BOS policy and chat templates of one model."""

    def __init__(
        self,
        backend: _Backend,
        *,
        name: str,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_templates: Mapping[str, str] | None = None,
        padding_side: str = "right",
    ):
        """Wrap `backend`. `add_bos_token`/`add_eos_token` given (either) replace its post-processor, as
        transformers does when a config states them; both None keep the backend's own post-processor."""
        self._backend = backend
        self.name = name
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(eos_token_ids))  # ordered union, first one is "the" EOS
        self._pad, self._unk = pad_token_id, unk_token_id
        self._templates = dict(chat_templates or {})
        self.padding_side = padding_side
        if add_bos_token is not None or add_eos_token is not None:
            backend.post_processor = _template_processor(backend, self._bos, self.eos_token_id,
                                                         bool(add_bos_token), bool(add_eos_token))
        # The post-processor is the one place BOS gets added, so encode() can never double it.
        starts = backend.encode("", add_special_tokens=True).ids[:1]
        self._add_bos = self._bos is not None and starts == [self._bos]
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        self._byte_ids = _byte_fallback_ids(backend)

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` plus the optional tokenizer_config / special_tokens_map /
        generation_config / chat_template.{jinja,json} files of a Hugging Face folder."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json",
                                 hint="point at a Hugging Face model folder, or use the model's GGUF file")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a plain Exception for any unreadable file
            raise TokenizerError(f"cannot read {tokenizer_file}: {exc}",
                                 hint="re-download the tokenizer files") from exc
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(key: str) -> int | None:
            text = _token_text(config[key] if key in config else special_map.get(key))
            if text is None:
                return None
            found = backend.token_to_id(text)
            if found is None:
                raise TokenizerError(f"{key} {text!r} named in {folder} is not in the vocabulary",
                                     hint="the tokenizer files disagree; re-download them")
            return found

        named = {key: token_id(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        # transformers makes every named special token special, even one tokenizer.json left as a plain token.
        _add_tokens(backend, [backend.id_to_token(i) for i in named.values() if i is not None], special=True)
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos = ([named["eos_token"]] if named["eos_token"] is not None else []) + gen_eos
        return cls(
            backend,
            name=str(folder),
            bos_token_id=named["bos_token"] if named["bos_token"] is not None else generation.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=named["pad_token"] if named["pad_token"] is not None else generation.get("pad_token_id"),
            unk_token_id=named["unk_token"],
            add_bos_token=config.get("add_bos_token"),
            add_eos_token=config.get("add_eos_token"),
            chat_templates=_folder_templates(folder, config),
            padding_side=config.get("padding_side") or _class_padding_side(folder, config),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes; `meta` maps GGUF keys to plain Python values."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}",
                                 hint="supported: 'gpt2' (byte-level BPE) and 'llama' (sentencepiece BPE)")
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens", hint="the file is not a complete model")
        types = list(meta.get("tokenizer.ggml.token_type") or [0] * len(tokens))
        scores = meta.get("tokenizer.ggml.scores")
        if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
            raise TokenizerError("GGUF token_type/scores lengths differ from tokenizer.ggml.tokens",
                                 hint="the file's tokenizer metadata is corrupt")
        merges = meta.get("tokenizer.ggml.merges")
        merges = [tuple(m.split(" ", 1)) for m in merges] if merges is not None else None
        arch = meta.get("general.architecture", "")

        def ggml_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is not None and not 0 <= value < len(tokens):
                raise TokenizerError(f"GGUF tokenizer.ggml.{key} {value} is outside the vocabulary",
                                     hint="the file's tokenizer metadata is corrupt")
            return value

        if kind == "gpt2":
            # A control token the file spells outside the byte alphabet is a llama.cpp mislabel; transformers
            # skips it (checked before respelling, which would hide it).
            alphabet = set(_byte_alphabet().values())
            control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
            backend, tokens = _byte_level_backend(tokens, merges, meta.get("tokenizer.ggml.pre"))
            style = "gpt2"
        else:
            style = "gemma" if arch in _GEMMA_ARCHS else "llama"
            backend, tokens = _sentencepiece_backend(tokens, merges, scores, gemma=style == "gemma")
            control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
        ids = {key: ggml_id(key) for key in ("bos_token_id", "eos_token_id", "padding_token_id",
                                             "unknown_token_id", "eot_token_id", "eom_token_id")}
        named = [tokens[i] for key, i in ids.items() if i is not None and key not in ("eot_token_id", "eom_token_id")]
        vocab = set(tokens)
        _add_tokens(backend, [t for t in _CLASS_SPECIALS[style] if t in vocab] + control + named, special=True)
        # USER_DEFINED tokens (e.g. <think>) are matched whole in text, but are not special.
        _add_tokens(backend, [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED], special=False)
        templates = {key.removeprefix("tokenizer.chat_template."): value for key, value in meta.items()
                     if key.startswith("tokenizer.chat_template.") and isinstance(value, str)}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        # llama.cpp adds BOS to a sentencepiece vocab that does not say otherwise; transformers follows it.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        # EOT/EOM (Gemma's <end_of_turn>, Llama 3's <|eot_id|>) also end a reply in llama.cpp.
        eos = [i for i in (ids["eos_token_id"], ids["eot_token_id"], ids["eom_token_id"]) if i is not None]
        return cls(
            backend,
            name=str(meta.get("general.name") or "GGUF model"),
            bos_token_id=ids["bos_token_id"],
            eos_token_ids=eos,
            pad_token_id=ids["padding_token_id"],
            unk_token_id=ids["unknown_token_id"],
            add_bos_token=bool(add_bos),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_templates=templates,
            # transformers builds a LlamaTokenizerFast / GemmaTokenizerFast for a GGUF of these families
            padding_side="left" if arch in ("llama", *_GEMMA_ARCHS) else "right",
        )

    @property
    def backend(self) -> _Backend:
        """The wrapped `tokenizers.Tokenizer`: its to_str() is this tokenizer's tokenizer.json."""
        return self._backend

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        return self._eos[0] if self._eos else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def bos_token(self) -> str | None:
        return None if self._bos is None else self._backend.id_to_token(self._bos)

    @property
    def eos_token(self) -> str | None:
        return None if not self._eos else self._backend.id_to_token(self._eos[0])

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def override_chat_template(self, source: str) -> None:
        """Use `source` (a jinja chat template, rendered in the same sandbox) instead of the checkpoint's;
        a template that does not parse is a TokenizerError here, not at the first message."""
        _compile_template(source)
        self._templates = {"default": source}

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS exactly as the post-processor adds them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """Ids, each token's (start, end) character span in `text`, and which ids are specials (BOS...)."""
        enc = self._backend.encode(text, add_special_tokens=add_special_tokens)
        return list(enc.ids), [tuple(o) for o in enc.offsets], [bool(m) for m in enc.special_tokens_mask]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids outside the vocabulary decode to nothing, as in transformers."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token spelled as in the vocabulary, or None if there is none."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary spelling of `token_id`, or None for an id outside the vocabulary."""
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int], skip_special_tokens: bool = False) -> list[str]:
        """Vocabulary spellings of `ids`; an id outside the vocabulary is an error."""
        out = []
        for i in ids:
            if skip_special_tokens and i in self._special_ids:
                continue
            token = self._backend.id_to_token(i)
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary of {self.vocab_size}",
                                     hint="the ids do not come from this tokenizer")
            out.append(token)
        return out

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """Render the model's chat template (sandboxed jinja) for `messages`, like transformers'
        `apply_chat_template(..., tokenize=False)`. Extra keyword arguments become template variables."""
        template = self._templates.get("tool_use") if tools is not None else None
        template = template or self._templates.get("default")
        if template is None:
            raise TokenizerError(f"{self.name} has no chat template",
                                 hint="use plain completion (no chat formatting) or a chat/instruct model")
        chat = _plain(list(messages))
        if not all(isinstance(m, dict) for m in chat):
            raise TokenizerError("chat messages must be mappings like {'role': ..., 'content': ...}",
                                 hint="pass a list of role/content dicts")
        # transformers passes its special-tokens map: the named tokens that are set.
        named = {"bos_token": self._bos, "eos_token": self.eos_token_id, "unk_token": self._unk, "pad_token": self._pad}
        variables = {k: self._backend.id_to_token(i) for k, i in named.items() if i is not None}
        variables.update(tools=_plain(tools), documents=None, **_plain(extra))
        compiled = _compile_template(template)
        try:
            return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:  # includes SecurityError from the sandbox
            raise TokenizerError(f"chat template failed: {exc}", hint="the template cannot render this input") from exc
        except (TypeError, ValueError) as exc:  # e.g. a template adding str to a message's list content
            raise TokenizerError(f"chat template failed on these messages: {exc}",
                                 hint="check each message's role/content against what the model expects") from exc


class StreamingDetokenizer:
    """Incremental decode: the segments `add_token` and `finalize` return concatenate to exactly
    `tokenizer.decode(all_ids)`, and never end inside a UTF-8 character.

    Like text-generation-inference, each step decodes only a window: the tokens of the previous emission
    (the prefix) plus the unread ones, and emits what the prefix's own decode lacks. Decoding with the
    prefix keeps sentencepiece's leading space right, since both decodes strip the same first space.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next token starts a new text."""
        self._window: list[int] = []  # prefix tokens, then unread tokens
        self._read = 0  # how many of the window's tokens are prefix
        self._prefix_text = ""  # decode of the prefix tokens alone
        self._segments: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._segments)

    def add_token(self, token_id: int) -> str:
        """Take one token id; return the text it completes (often "", when it is held back)."""
        self._window.append(token_id)
        # ByteFallback decodes a run of <0xNN> tokens all-or-nothing: one bad byte turns the whole run into
        # U+FFFD, so no part of a run is final until a token that is not a byte ends it. A skipped special
        # token decodes to nothing and does not end the run.
        if token_id in self._tok._byte_ids or (self._skip and token_id in self._tok._special_ids):
            return ""
        return self._emit(final=False)

    def finalize(self) -> str:
        """Flush the held-back remainder (an unfinished character becomes U+FFFD, as in decode()).
        The stream ends here: call reset() before feeding a new one."""
        segment = self._emit(final=True)
        self._window, self._read, self._prefix_text = [], 0, ""
        return segment

    def _emit(self, final: bool) -> str:
        text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        # A trailing U+FFFD is a character still missing bytes, which later tokens may complete.
        if len(text) <= len(self._prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        segment = text[len(self._prefix_text):]
        self._segments.append(segment)
        # The tokens just read become the next prefix; older ones are dropped, so the window stays short.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._tok.decode(self._window, skip_special_tokens=self._skip)
        return segment



@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
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


def _byte_level_backend(tokens: list[str], merges: list[tuple] | None, pre: str | None) -> tuple[_Backend, list[str]]:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Some files store a token as raw UTF-8 text; transformers respells it in the byte alphabet.
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        _check_merges(merges, vocab)
    model = BPE(vocab=vocab, merges=merges if merges is not None else derive_merges(vocab, None),
                dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = _Backend(model)
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


def _sentencepiece_backend(tokens: list[str], merges: list[tuple] | None, scores: Sequence[float] | None,
                           gemma: bool) -> tuple[_Backend, list[str]]:
    if gemma:
        # Gemma files store whitespace-only tokens as real spaces, looked up as "▁" runs; and their
        # scores do not follow merge order, the file order does.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
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
    backend = _Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None, unk_token=unk))
    if gemma:  # no prefix space: spaces become "▁" and nothing else
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        # transformers' LlamaTokenizer (legacy=False): "▁" before the first text piece only, stripped on decode.
        # It ignores tokenizer.ggml.add_space_prefix, and so do we.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return backend, tokens


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


def _class_padding_side(folder: Path, config: dict) -> str:
    """The padding side of the class transformers picks: tokenizer_class, else the one of config.json's
    model_type (LlamaTokenizerFast for "llama", GemmaTokenizerFast for the Gemmas)."""
    name = config.get("tokenizer_class")
    if name is None:
        model_type = _read_json(folder / "config.json").get("model_type")
        return "left" if model_type == "llama" or model_type in _GEMMA_ARCHS else "right"
    return "left" if name in _LEFT_PADDING_CLASSES else "right"


def _add_tokens(backend: _Backend, names: Iterable[str], special: bool) -> None:
    """Add `names` as whole-match tokens unless already added (transformers keeps the first flag)."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    fresh = [AddedToken(n, special=special, normalized=False) for n in dict.fromkeys(names) if n not in added]
    (backend.add_special_tokens if special else backend.add_tokens)(fresh)


def _template_processor(backend: _Backend, bos: int | None, eos: int | None, add_bos: bool, add_eos: bool):
    """transformers' update_post_processor: BOS/EOS around each sequence; a flag without its token is off."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    b = backend.id_to_token(bos) if add_bos else ""
    e = backend.id_to_token(eos) if add_eos else ""
    single = f"{b + ':0 ' if b else ''}$A:0{' ' + e + ':0' if e else ''}"
    pair = f"{single}{' ' + b + ':1' if b else ''} $B:1{' ' + e + ':1' if e else ''}"
    specials = ([(b, bos)] if b else []) + ([(e, eos)] if e and e != b else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _byte_fallback_ids(backend: _Backend) -> frozenset[int]:
    """Ids of <0xNN> tokens, when the decoder assembles them into characters (ByteFallback)."""
    decoder = backend.decoder
    if decoder is None or decoder.decode(["<0xE4>", "<0xB8>", "<0xAD>"]) != "\u4e2d":
        return frozenset()
    ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)



def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}", hint="re-download the tokenizer files") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object", hint="re-download the tokenizer files")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_templates(value: Any) -> dict[str, str]:
    """A `chat_template` value: one template, or a list of {"name", "template"}."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


def _folder_templates(folder: Path, config: dict) -> dict[str, str]:
    # Newer layouts keep the template in its own file, which wins over tokenizer_config.json's copy.
    templates = _named_templates(config.get("chat_template"))
    templates.update(_named_templates(_read_json(folder / "chat_template.json").get("chat_template")))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates



def _raise_exception(message: str):
    raise TokenizerError(f"chat template rejected the conversation: {message}",
                         hint="change the messages (e.g. drop the system message) to fit the model's template")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON (transformers overrides it the same way).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from downloaded files: sandboxed, immutable, with transformers' whitespace settings.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template does not parse: {exc} (line {exc.lineno})",
                             hint="the model's chat template is broken; fix or replace it") from exc


def _plain(value: Any) -> Any:
    """A copy made of JSON types only, so the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (str, int, float):  # subclasses (str enums, numpy floats) are cut back to the base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    raise TokenizerError(f"chat template input holds a {type(value).__name__}, not JSON data",
                         hint="pass messages, tools and extras as str/int/float/bool/None, lists and dicts")
