"""What every checkpoint source offers: config, tokenizer, generation defaults and tensors by name, lazily."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import TokenizerError

if TYPE_CHECKING:  # torch only in annotations: resolving a reference (checkpoint.resolve) stays torch-free
    import torch

# select(name, shape) -> an index (tuple of slices) or None: read only that part of a tensor (a
# tensor-parallel rank's slice) or the whole of it.
Select = Callable[[str, tuple[int, ...]], "tuple[slice, ...] | None"]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as it will come out: HF name, HF-layout shape, the source's dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Checkpoint:
    """An opened source. Opening reads the config only; the tensor list, the tokenizer and the tensors
    are read when asked for, so config- and tokenizer-only commands never touch the weights.

    Subclasses: hf.HFCheckpoint (HF folders, Hub snapshots, our quantized folders), gguf.GGUFCheckpoint,
    meta.MetaCheckpoint.
    """

    kind: str  # "folder" | "gguf" | "meta"
    path: Path
    config: ModelConfig
    config_dict: dict[str, Any]  # what config.json will say (HF names), before the dtype is set
    default_dtype: torch.dtype | None = None  # the dtype used when none is asked for (None: each tensor's own)
    warnings: list[str]  # what a conversion could not carry over (set by __init__)

    @cached_property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor `read` yields, in its order (reads headers, not data)."""
        raise NotImplementedError

    def read(self, dtype: torch.dtype | None, select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in HF layout, cast to `dtype` unless None) in `tensors` order, one at a time."""
        raise NotImplementedError

    def tokenizer(self):
        """The core.tokenizer.Tokenizer of the source."""
        raise NotImplementedError

    def generation_config(self) -> dict[str, Any]:
        """The sampling defaults the checkpoint ships (generation_config.json), or those llm gives a built-in
        model's file (checkpoint.resolve.EMBEDDED_MODELS); {} when it has none."""
        from .resolve import embedded_generation_config

        return embedded_generation_config(self.path)

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        """Set for our pre-quantized folders (quant/ reads them)."""
        return self.config.quantization_config

    def release_metadata(self) -> None:
        """Drop what only the tokenizer needed, before the weights are read (peak memory)."""

    def write_tokenizer_files(self, folder: Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json."""
        raise NotImplementedError

    def sentencepiece_model(self):
        """The source's sentencepiece model (core.tokenizer.sentencepiece.SPModel), which llama.cpp's converter
        prefers for its vocabulary (it has the scores); None when there is none."""
        return None

    def close(self) -> None:
        pass


def selected(tensors: Iterator[tuple[str, torch.Tensor]], select: Select | None) -> Iterator[tuple[str, torch.Tensor]]:
    """Cut each whole tensor of a stream to its selected part (sources that cannot read a part alone)."""
    for name, tensor in tensors:
        index = None if select is None else select(name, tuple(tensor.shape))
        yield name, (tensor if index is None else tensor[index].contiguous())


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from (pair, 2) order to (2, pair) order: Meta/GGUF rotary layout -> HF's."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves: HF rotate-half rows -> Meta/GGUF interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config_for(config: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """The generation_config.json a converted checkpoint gets: its BOS / EOS / pad ids, no sampling defaults."""
    eos = list(dict.fromkeys([*config.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]))
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return {k: v for k, v in out.items() if v not in (None, [])}


def spm_tokenizer(model_file: Path, folder: Path | None):
    """A core Tokenizer from a sentencepiece model (plus tokenizer_config.json when the folder has one)."""
    from llm_torch.core.tokenizer import sentencepiece as sp
    from llm_torch.core.tokenizer import Tokenizer

    m = sp.read_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(sp.to_backend(m).to_str(), encoding="utf-8")
        own = folder / "tokenizer_config.json" if folder else None
        try:
            config = json.loads(own.read_text(encoding="utf-8")) if own and own.is_file() else sp.tokenizer_config(m)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{own} is not valid JSON: {e}", hint="re-download the tokenizer files") from None
        write_json(Path(tmp) / "tokenizer_config.json", config)
        return Tokenizer.from_folder(tmp)
