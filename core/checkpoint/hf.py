"""A Hugging Face folder (config.json, safetensors, tokenizer files): local, a Hub snapshot, or our
quantized output (its config carries a quantization_config that quant/ reads)."""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from llm_torch.core.model.config import ModelConfig, read_config_json
from llm_torch.core.errors import ConfigError, ModelNotFoundError
from .base import Checkpoint, TensorInfo, generation_config_for, spm_tokenizer, write_json

# Tokenizer / generation files copied as they are from an HF source folder.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "chat_template.jinja", "chat_template.json", "generation_config.json")


class HFCheckpoint(Checkpoint):
    kind = "folder"

    def __init__(self, path: Path):
        if not path.is_dir():
            raise ModelNotFoundError(f"no model folder at {path}")
        self.warnings = []
        self.path = path

    # Read when asked for: a folder with only tokenizer files still gives its tokenizer (llm tokenize).
    @cached_property
    def config_dict(self) -> dict[str, Any]:
        return read_config_json(self.path)

    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config_dict)

    @cached_property
    def _entries(self) -> list[tuple[Path, TensorInfo, int, int]]:
        # The safetensors module (and torch with it) only when tensors are asked for: config and tokenizer need neither.
        from .safetensors import read_index, safetensors_files

        return [(f, info, offset, n) for f in safetensors_files(self.path) for info, offset, n in read_index(f)]

    @cached_property
    def tensors(self) -> list[TensorInfo]:
        return [info for _, info, _, _ in self._entries]

    def read(self, dtype, select=None):
        from .safetensors import read_tensors

        # A generator: the headers are parsed when the first tensor is asked for, not at the call.
        yield from read_tensors(self._entries, dtype, select)

    def tokenizer(self):
        from llm_torch.core.tokenizer import Tokenizer

        if (self.path / "tokenizer.json").is_file() or not (self.path / "tokenizer.model").is_file():
            return Tokenizer.from_folder(self.path)
        return spm_tokenizer(self.path / "tokenizer.model", self.path)

    def generation_config(self) -> dict[str, Any]:
        path = self.path / "generation_config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None

    def write_tokenizer_files(self, folder):
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, folder / name)
        if not (folder / "tokenizer.json").is_file() and (self.path / "tokenizer.model").is_file():
            # An older folder with only the sentencepiece model: add the tokenizer.json our loader needs.
            from llm_torch.core.tokenizer import sentencepiece as sp

            m = sp.read_model(self.path / "tokenizer.model")
            (folder / "tokenizer.json").write_text(sp.to_backend(m).to_str(), encoding="utf-8")
            if not (folder / "tokenizer_config.json").is_file():
                write_json(folder / "tokenizer_config.json", sp.tokenizer_config(m, None, self.config.max_position_embeddings))
        if not (folder / "generation_config.json").is_file():
            write_json(folder / "generation_config.json", generation_config_for(self.config))
        if not (folder / "tokenizer.json").is_file():
            self.warnings.append(f"{self.path} has no tokenizer.json or tokenizer.model: the output has no tokenizer")

    def sentencepiece_model(self):
        spm_file = self.path / "tokenizer.model"
        if not spm_file.is_file():
            return None
        from llm_torch.core.tokenizer import sentencepiece as sp

        return sp.read_model(spm_file)
