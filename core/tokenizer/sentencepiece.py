"""A sentencepiece `tokenizer.model` -> a `tokenizers` pipeline that encodes exactly like sentencepiece.

The model file is a protobuf (sentencepiece_model.proto); only the few fields a tokenizer needs are
decoded here, with our own wire-format reader, so neither `sentencepiece` nor `protobuf` is needed
at run time. The pipeline differs from transformers' LlamaConverter (legacy=False) on purpose: that
one's Metaspace pre-tokenizer keeps one "▁" where sentencepiece adds another before leading
whitespace; a Prepend normalizer is what sentencepiece's add_dummy_prefix does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE, Unigram

from llm_torch.core.errors import TokenizerError, UnsupportedError

# sentencepiece_model.proto enums.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE_MODEL = 1, 2
_SPACE = "\u2581"


@dataclass
class SentencePieceModel:
    """The fields of a ModelProto a tokenizer needs (proto defaults where the file omits one)."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    precompiled_charsmap: bytes = b""
    treat_whitespace_as_suffix: bool = False

    def piece(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None


# ------------------------------------------------------------------------------------- protobuf reading


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of one message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("field runs past the end")
        yield number, wire, value


def _signed(v: int) -> int:
    # int32 fields are varint-encoded two's complement over 64 bits (pad_id = -1).
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_model(data: bytes) -> SentencePieceModel:
    """Decode a serialized ModelProto (the bytes of a tokenizer.model file)."""
    m = SentencePieceModel()
    try:
        for number, _, value in _fields(data):
            if number == 1:  # SentencePiece {1: piece, 2: score (float), 3: type}
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(kind)
            elif number == 2:  # TrainerSpec
                for n, _, v in _fields(value):
                    if n == 3:
                        m.model_type = v
                    elif n == 35:
                        m.byte_fallback = bool(v)
                    elif n == 24:
                        m.treat_whitespace_as_suffix = bool(v)
                    elif n in (40, 41, 42, 43):
                        setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[n], _signed(v))
            elif number == 3:  # NormalizerSpec
                for n, _, v in _fields(value):
                    if n == 2:
                        m.precompiled_charsmap = bytes(v)
                    elif n == 3:
                        m.add_dummy_prefix = bool(v)
                    elif n == 4:
                        m.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        m.escape_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise TokenizerError(f"tokenizer.model is not a sentencepiece model: {e}", hint="the file may be truncated") from None
    if not m.pieces:
        raise TokenizerError("tokenizer.model holds no pieces", hint="the file is not a sentencepiece model")
    return m


def read_model(path: str | Path) -> SentencePieceModel:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_model(data)


# ------------------------------------------------------------------------------------- tokenizers pipeline


def to_backend(m: SentencePieceModel) -> _Backend:
    """A `tokenizers.Tokenizer` that encodes and decodes like sentencepiece with this model.

    BOS/EOS follow the Llama convention (BOS added, EOS not); the caller's tokenizer_config may say otherwise.
    """
    if m.treat_whitespace_as_suffix or not m.escape_whitespaces:
        raise UnsupportedError("sentencepiece models with treat_whitespace_as_suffix or without escape_whitespaces "
                               "are not supported")
    unk = m.piece(m.unk_id)
    if m.model_type == BPE_MODEL:
        from . import derive_merges

        vocab = {p: i for i, p in enumerate(m.pieces)}
        # Only pieces sentencepiece's BPE can produce take part in merges (not <s>, <0x41>, ...).
        ranks = {p: s for p, s, t in zip(m.pieces, m.scores, m.types) if t in (NORMAL, USER_DEFINED)}
        model = BPE(vocab=vocab, merges=derive_merges(vocab, ranks), unk_token=unk, fuse_unk=True,
                    byte_fallback=m.byte_fallback, dropout=None)
    elif m.model_type == UNIGRAM:
        model = Unigram([(p, s) for p, s in zip(m.pieces, m.scores)], m.unk_id if unk else None, m.byte_fallback)
    else:
        raise UnsupportedError(f"sentencepiece model type {m.model_type} is not supported", hint="BPE and unigram are")
    backend = _Backend(model)
    steps = []
    if m.precompiled_charsmap:
        steps.append(normalizers.Precompiled(m.precompiled_charsmap))
    if m.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if m.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    steps.append(normalizers.Replace(" ", _SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if m.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    # Control and unknown pieces are specials; user-defined ones are matched whole, as sentencepiece does.
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(m.pieces, m.types) if t in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, t in zip(m.pieces, m.types) if t == USER_DEFINED])
    bos = m.piece(m.bos_id)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, m.bos_id)])
    return backend


def tokenizer_config(m: SentencePieceModel, chat_template: str | None = None, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for the pipeline of to_backend (special tokens, BOS policy, template)."""
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": m.piece(m.bos_id) is not None,
                    "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for key, i in (("bos_token", m.bos_id), ("eos_token", m.eos_id), ("unk_token", m.unk_id), ("pad_token", m.pad_id)):
        if m.piece(i) is not None:
            config[key] = m.piece(i)
    if chat_template:
        config["chat_template"] = chat_template
    if model_max_length:
        config["model_max_length"] = model_max_length
    return config
