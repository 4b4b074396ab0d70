"""A Hugging Face folder's tokenizer: tokenizer.json plus tokenizer_config / special_tokens_map /
generation_config / chat_template.{jinja,json}, read the way transformers' AutoTokenizer reads them, into
the arguments Tokenizer.from_folder builds the Tokenizer from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from llm_torch.core.errors import TokenizerError
from llm_torch.core.model.families import tokenizer_class_for
from .chat_template import named_templates
from .special_tokens import add_tokens


def read_folder(path: str | Path, *, legacy: bool | None = None,
                add_prefix_space: bool | None = None) -> tuple[Backend, dict[str, Any]]:
    """The folder's backend and the Tokenizer's keyword arguments; `legacy` / `add_prefix_space` given
    override tokenizer_config.json's."""
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(f"{folder} has no tokenizer.json",
                             hint="point at a Hugging Face model folder, or use the model's GGUF file")
    try:
        text = tokenizer_file.read_text(encoding="utf-8")
        backend = Backend.from_str(text)
    except Exception as exc:  # tokenizers raises a plain Exception for any unreadable file
        raise TokenizerError(f"cannot read {tokenizer_file}: {exc}",
                             hint="re-download the tokenizer files") from exc
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    def token_id(key: str) -> int | None:
        name = _token_text(config[key] if key in config else special_map.get(key))
        if name is None:
            return None
        found = backend.token_to_id(name)
        if found is None:
            raise TokenizerError(f"{key} {name!r} named in {folder} is not in the vocabulary",
                                 hint="the tokenizer files disagree; re-download them")
        return found

    named = {key: token_id(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    # transformers makes every named special token special, even one tokenizer.json left as a plain token.
    add_tokens(backend, [backend.id_to_token(i) for i in named.values() if i is not None], special=True)
    gen_eos = generation.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos = ([named["eos_token"]] if named["eos_token"] is not None else []) + gen_eos
    return backend, dict(
        name=str(folder),
        bos_token_id=named["bos_token"] if named["bos_token"] is not None else generation.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=named["pad_token"] if named["pad_token"] is not None else generation.get("pad_token_id"),
        unk_token_id=named["unk_token"],
        add_bos_token=config.get("add_bos_token"),
        add_eos_token=config.get("add_eos_token"),
        chat_templates=_folder_templates(folder, config),
        llama_spaces=_llama_spaces(folder, config, text, backend, legacy, add_prefix_space),
        padding_side=config.get("padding_side") or _class_padding_side(folder, config),
    )


# Tokenizer classes transformers pads on the left (their class default padding_side).
_LEFT_PADDING_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                         "GemmaTokenizer", "GemmaTokenizerFast")


def _class_padding_side(folder: Path, config: dict) -> str:
    """The padding side of the class transformers picks: tokenizer_class, else the one of config.json's
    model_type (LlamaTokenizerFast for "llama", GemmaTokenizerFast for the Gemmas)."""
    name = config.get("tokenizer_class")
    if name is None:
        name = tokenizer_class_for(str(_read_json(folder / "config.json").get("model_type")))
    return "left" if name in _LEFT_PADDING_CLASSES else "right"


def _llama_spaces(folder: Path, config: dict, text: str, backend: Backend, legacy: bool | None,
                  add_prefix_space: bool | None) -> tuple[bool, bool] | None:
    """(legacy, add_prefix_space) when transformers loads the folder as LlamaTokenizer, else None.

    AutoTokenizer takes the class tokenizer_config.json names, except for a byte-level tokenizer.json
    (Llama 3 repos naming LlamaTokenizer); LlamaTokenizer then rebuilds the pipeline from its options,
    legacy=False and add_prefix_space=True unless the config says otherwise.
    """
    declared = str(config.get("tokenizer_class") or "")
    if declared.removesuffix("Fast") != "LlamaTokenizer" or '"ByteLevel"' in text or not isinstance(backend.model, BPE):
        if legacy is not None or add_prefix_space is not None:
            raise TokenizerError(f"legacy / add_prefix_space apply to a LlamaTokenizer (sentencepiece) vocabulary; "
                                 f"{folder} names tokenizer_class {declared or 'none'}",
                                 hint="leave the options out for this model")
        return None
    if legacy is None:
        legacy = bool(config.get("legacy"))  # absent or null: transformers' legacy=False
    if add_prefix_space is None:
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    return legacy, add_prefix_space


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


def _folder_templates(folder: Path, config: dict) -> dict[str, str]:
    # Newer layouts keep the template in its own file, which wins over tokenizer_config.json's copy.
    templates = named_templates(config.get("chat_template"))
    templates.update(named_templates(_read_json(folder / "chat_template.json").get("chat_template")))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates
