"""Write a quantized model as a Hugging Face folder: config.json with `quantization_config`,
model.safetensors, tokenizer files and chat templates. Atomic: built in a temporary folder next to the
destination and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from llm_torch.core.errors import InputError, ResourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise InputError(f"{out} already exists", hint="choose another -o folder, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")


def save_quantized(
    out: Path,
    *,
    config_raw: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any],
    dtype: torch.dtype,
    source_folder: Path | None,
    tokenizer=None,
    generation_config: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write the folder; `tensors` are checkpoint-named. Tokenizer files are copied from a source folder,
    or written from `tokenizer` (a GGUF's tokenizer rebuilt from its metadata)."""
    from llm_torch.core.checkpoint.safetensors import save_safetensors

    out = Path(out)
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        save_safetensors(tmp / "model.safetensors", tensors)
        config = dict(config_raw)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=_json_default) + "\n", encoding="utf-8")
        if source_folder is not None:
            for name in TOKENIZER_FILES:
                if (source_folder / name).is_file():
                    shutil.copy2(source_folder / name, tmp / name)
        elif tokenizer is not None:
            write_tokenizer(tmp, tokenizer, generation_config or {})
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ResourceError(f"cannot write {out}: {e.strerror or e}", hint="check the free disk space and permissions") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_tokenizer(folder: Path, tokenizer, generation_config: dict[str, Any]) -> None:
    """tokenizer.json + tokenizer_config.json (specials, BOS policy, chat template) of a loaded Tokenizer."""
    tokenizer.backend.save(str(folder / "tokenizer.json"))  # the wrapped `tokenizers.Tokenizer`
    settings: dict[str, Any] = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                                "add_bos_token": tokenizer.add_bos_token, "add_eos_token": False}
    if tokenizer.pad_token_id is not None:
        settings["pad_token"] = tokenizer.id_to_token(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        settings["chat_template"] = tokenizer.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    generation = dict(generation_config)
    if len(tokenizer.eos_token_ids) > 1:
        generation.setdefault("eos_token_id", list(tokenizer.eos_token_ids))
    if generation:
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
