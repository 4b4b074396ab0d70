"""The Tokenizer: a `tokenizers.Tokenizer` plus the special-token ids, BOS policy, sentencepiece space
options and chat templates of one model. Its two sources, hf_folder.py (a Hugging Face folder) and
gguf_vocab.py, read those into the constructor's arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from llm_torch.core.errors import TokenizerError
from . import chat_template
from .backends import SPACE, set_llama_spaces, skips_dummy_prefix
from .gguf_vocab import read_gguf_vocab
from .hf_folder import read_folder
from .special_tokens import bos_eos_processor, byte_fallback_ids, special_ids


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids, BOS policy, space options and chat templates
    of one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        name: str,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_templates: Mapping[str, str] | None = None,
        llama_spaces: tuple[bool, bool] | None = None,
        padding_side: str = "right",
    ):
        """Wrap `backend`. `add_bos_token`/`add_eos_token` given (either) replace its post-processor, as
        transformers does when a config states them; both None keep the backend's own post-processor.
        `llama_spaces` = (legacy, add_prefix_space) gives it LlamaTokenizer's pipeline for those options."""
        self._backend = backend
        self.name = name
        self._bos = bos_token_id
        self._eos = tuple(dict.fromkeys(eos_token_ids))  # ordered union, first one is "the" EOS
        self._pad, self._unk = pad_token_id, unk_token_id
        self._templates = dict(chat_templates or {})
        # transformers' class default: also what puts the context before the question in its QA pipeline (qa.py)
        self.padding_side = padding_side
        if add_bos_token is not None or add_eos_token is not None:
            backend.post_processor = bos_eos_processor(backend, self._bos, self.eos_token_id,
                                                       bool(add_bos_token), bool(add_eos_token))
        self._spaces = llama_spaces
        if llama_spaces is not None:
            set_llama_spaces(backend, *llama_spaces)
        self._skips_dummy_prefix = skips_dummy_prefix(backend)
        # The post-processor is the one place BOS gets added, so encode() can never double it.
        starts = backend.encode("", add_special_tokens=True).ids[:1]
        self._add_bos = self._bos is not None and starts == [self._bos]
        self._special_ids = special_ids(backend)
        self._byte_ids = byte_fallback_ids(backend)

    @classmethod
    def from_folder(cls, path: str | Path, *, legacy: bool | None = None,
                    add_prefix_space: bool | None = None) -> Tokenizer:
        """Load `tokenizer.json` plus the optional tokenizer_config / special_tokens_map /
        generation_config / chat_template.{jinja,json} files of a Hugging Face folder. `legacy` /
        `add_prefix_space` given override the config's (LlamaTokenizer vocabularies only)."""
        backend, options = read_folder(path, legacy=legacy, add_prefix_space=add_prefix_space)
        return cls(backend, **options)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, legacy: bool | None = None,
                           add_prefix_space: bool | None = None) -> Tokenizer:
        """Build the tokenizer a GGUF file describes; `meta` maps GGUF keys to plain Python values."""
        backend, options = read_gguf_vocab(meta, legacy=legacy, add_prefix_space=add_prefix_space)
        return cls(backend, **options)

    @property
    def backend(self) -> Backend:
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
        chat_template.compile_template(source)
        self._templates = {"default": source}

    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default")

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def legacy(self) -> bool | None:
        """LlamaTokenizer's `legacy` in force; None for a vocabulary not built as LlamaTokenizer."""
        return None if self._spaces is None else self._spaces[0]

    @property
    def add_prefix_space(self) -> bool | None:
        """LlamaTokenizer's `add_prefix_space` in force; None for a vocabulary not built as LlamaTokenizer."""
        return None if self._spaces is None else self._spaces[1]

    def override_spaces(self, *, legacy: bool | None = None, add_prefix_space: bool | None = None) -> None:
        """Use these LlamaTokenizer options instead of the checkpoint's (None keeps one), like passing them to
        `from_pretrained`; any other vocabulary is a TokenizerError when one is given."""
        if legacy is None and add_prefix_space is None:
            return
        if self._spaces is None:
            raise TokenizerError(f"legacy / add_prefix_space apply to a LlamaTokenizer (sentencepiece) vocabulary, "
                                 f"and {self.name} is not one", hint="leave the options out for this model")
        self._spaces = (self._spaces[0] if legacy is None else legacy,
                        self._spaces[1] if add_prefix_space is None else add_prefix_space)
        set_llama_spaces(self._backend, *self._spaces)
        self._skips_dummy_prefix = skips_dummy_prefix(self._backend)

    @property
    def keeps_dummy_prefix(self) -> bool:
        """Whether a text starting with a space gets sentencepiece's dummy "▁" too (" Hello" -> "▁▁Hello"), where
        transformers 5 drops it; True for sentencepiece vocabularies that prepend one (README: Tokenization)."""
        return self._skips_dummy_prefix or bool(self._spaces and self._spaces[0] and self._spaces[1])

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (what skip_special_tokens drops)."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of <0xNN> byte tokens the decoder assembles into characters; empty without byte fallback."""
        return self._byte_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS exactly as the post-processor adds them."""
        return self._encode(text, add_special_tokens)[0].ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        """Ids, each token's (start, end) character span in `text`, and which ids are specials (BOS...)."""
        enc, shift = self._encode(text, add_special_tokens)
        offsets = [(max(s - shift, 0), max(e - shift, 0)) for s, e in enc.offsets]
        return list(enc.ids), offsets, [bool(m) for m in enc.special_tokens_mask]

    def _encode(self, text: str, add_special_tokens: bool):
        """The backend's Encoding, and how many characters were put before `text` for it."""
        if self._skips_dummy_prefix and text[:1] in (" ", SPACE):
            # sentencepiece's dummy "▁" before a leading space, which Metaspace's "first" scheme skips (backends.py)
            return self._backend.encode(SPACE + text, add_special_tokens=add_special_tokens), 1
        return self._backend.encode(text, add_special_tokens=add_special_tokens), 0

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
        # transformers passes its special-tokens map: the named tokens that are set.
        named = {"bos_token": self._bos, "eos_token": self.eos_token_id, "unk_token": self._unk, "pad_token": self._pad}
        variables = {k: self._backend.id_to_token(i) for k, i in named.items() if i is not None}
        variables.update(tools=chat_template.plain(tools), documents=None, **chat_template.plain(extra))
        return chat_template.render(template, chat_template.plain(list(messages)), add_generation_prompt, variables)
