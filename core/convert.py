"""`llm convert`: any checkpoint the loader reads (HF folder / Hub repo, GGUF file, Meta's original
Llama layout) -> a Hugging Face folder (sharded safetensors) or a GGUF file.

    result = convert(ConvertSpec(source="smollm2", output=Path("out")), progress=callback)

Tensors stream one at a time, source to output: each is read (memory-mapped), converted to HF
layout and the target dtype, written, and dropped. The output is built in a temporary folder next
to it and renamed into place only when complete, so a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ModelConfig
from .errors import CheckpointError, InputError, LLMError, ModelNotFoundError, ResourceError, UnsupportedError
from .loading import DTYPE_ALIASES, DTYPES, ResolvedModel, resolve_model

# progress(done_bytes, total_bytes, tensor_name): called after each tensor is written.
ProgressFn = Callable[[int, int, str], None]

TARGETS = ("hf", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default ("5GB")
# Tokenizer / generation files copied as they are from an HF source folder.
_HF_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "chat_template.jinja", "chat_template.json", "generation_config.json")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# --verify: max |logit difference| allowed, as a fraction of the source's largest |logit|.
_TOLERANCE = {"float32": 1e-4, "f32": 1e-4, "float16": 2e-2, "f16": 2e-2, "bfloat16": 8e-2, "bf16": 8e-2, "q8_0": 0.15}
_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1234 日本語"


@dataclass(frozen=True)
class ConvertSpec:
    source: str  # anything resolve_model takes, or a Meta-layout folder
    output: Path  # the folder (hf) or file (gguf) to create
    to: str = "hf"
    dtype: str | None = None  # hf: float32 | bfloat16 | float16; None keeps the source's
    outtype: str = "f16"  # gguf: f32 | f16 | bf16 | q8_0
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    verify: bool = False


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    tensors: int
    bytes_written: int
    seconds: float
    max_abs_diff: float | None = None  # --verify: max |logits(source) - logits(output)|
    tolerance: float | None = None
    warnings: tuple[str, ...] = ()  # for the CLI to show (core never prints)


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
    """An opened source: config, tensors readable one at a time in `tensors` order, tokenizer files.

    Subclasses: HFCheckpoint, GGUFCheckpoint, meta_llama.MetaCheckpoint.
    """

    kind: str  # "folder" | "gguf" | "meta"
    path: Path
    config: ModelConfig
    config_dict: dict[str, Any]  # what config.json will say (HF names), before the dtype is set
    tensors: list[TensorInfo]
    default_dtype: torch.dtype | None = None  # the dtype used when none is asked for (None: each tensor's own)
    warnings: list[str]  # what the conversion could not carry over (set by __init__)

    def read(self, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in HF layout, cast to `dtype` unless None) in `tensors` order."""
        raise NotImplementedError

    def tokenizer(self):
        """The core.tokenizer.Tokenizer of the source."""
        raise NotImplementedError

    def write_tokenizer_files(self, folder: Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json."""
        raise NotImplementedError

    def gguf_vocab(self) -> dict[str, Any]:
        """The tokenizer.* GGUF metadata (key -> plain value) llama.cpp needs."""
        from . import gguf_writer

        return gguf_writer.vocab_from_tokenizer(self.tokenizer(), self.config)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- sources


class HFCheckpoint(Checkpoint):
    kind = "folder"

    def __init__(self, path: Path):
        from .config import load_config

        self.warnings = []
        from .loading import safetensors_files

        self.path = path
        self.config = load_config(path)
        self.config_dict = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.tensors = []
        self._where: list[tuple[Path, int, int]] = []  # per tensor: file, byte offset, byte count
        for f in safetensors_files(path):
            for info, offset, nbytes in _safetensors_index(f):
                self.tensors.append(info)
                self._where.append((f, offset, nbytes))

    def read(self, dtype):
        # Plain reads into a fresh buffer rather than a memory map: the mapped pages of a whole shard
        # would stay resident and count towards peak RSS; this way one tensor is in memory at a time.
        handles: dict[Path, Any] = {}
        try:
            for info, (file, offset, nbytes) in zip(self.tensors, self._where):
                f = handles.get(file)
                if f is None:
                    for old in handles.values():
                        old.close()
                    try:
                        f = open(file, "rb")
                    except OSError as e:
                        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
                    handles = {file: f}
                buf = torch.empty(nbytes, dtype=torch.uint8)
                try:
                    f.seek(offset)
                    got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
                except OSError as e:
                    raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
                if got != nbytes:
                    raise CheckpointError(f"{file.name} ends inside tensor '{info.name}'",
                                          hint="the file is truncated; download it again")
                t = buf.view(info.dtype).reshape(info.shape)
                yield info.name, t if dtype is None else t.to(dtype)
        finally:
            for f in handles.values():
                f.close()

    def tokenizer(self):
        from .tokenizer import Tokenizer

        if (self.path / "tokenizer.json").is_file() or not (self.path / "tokenizer.model").is_file():
            return Tokenizer.from_folder(self.path)
        return _spm_tokenizer(self.path / "tokenizer.model", self.path)

    def write_tokenizer_files(self, folder):
        for name in _HF_SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, folder / name)
        if not (folder / "tokenizer.json").is_file() and (self.path / "tokenizer.model").is_file():
            # An older folder with only the sentencepiece model: add the tokenizer.json our loader needs.
            from . import sentencepiece as sp

            m = sp.read_model(self.path / "tokenizer.model")
            (folder / "tokenizer.json").write_text(sp.to_backend(m).to_str(), encoding="utf-8")
            if not (folder / "tokenizer_config.json").is_file():
                _write_json(folder / "tokenizer_config.json", sp.tokenizer_config(m, None, self.config.max_position_embeddings))
        if not (folder / "generation_config.json").is_file():
            _write_json(folder / "generation_config.json", _generation_config(self.config))
        if not (folder / "tokenizer.json").is_file():
            self.warnings.append(f"{self.path} has no tokenizer.json or tokenizer.model: the output has no tokenizer")

    def gguf_vocab(self):
        from . import gguf_writer

        spm_file = self.path / "tokenizer.model"
        if spm_file.is_file() and self.config.model_type in ("llama", "gemma2"):
            # llama.cpp's own converter prefers the sentencepiece model (it has the scores).
            from . import sentencepiece as sp

            tok = self.tokenizer()
            return gguf_writer.vocab_from_sentencepiece(sp.read_model(spm_file), self.config, tok.chat_template,
                                                        add_bos=tok.add_bos_token)
        return gguf_writer.vocab_from_tokenizer(self.tokenizer(), self.config)


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"

    def __init__(self, path: Path):
        from gguf import GGMLQuantizationType as Q

        from . import gguf
        from .loading import ResolvedModel, load_model_config

        self.warnings = []
        self.path = path
        source = load_model_config(ResolvedModel(str(path), "gguf", path))
        self.config = source.config
        self.config_dict = {k: v for k, v in source.config.raw.items() if k not in ("rope_parameters",)}
        self._reader, self.meta = source.gguf_reader, source.gguf_meta
        n_layers = self.config.num_hidden_layers
        # Unquantized files keep their dtype; dequantized ones become float16, which holds Q8/Q4 block
        # values (fp16 scale x small int) more exactly than bfloat16 (the loader's --dtype auto on CPU).
        own = {Q.F32: torch.float32, Q.BF16: torch.bfloat16}
        kinds = []
        self.tensors = []
        for t in self._reader.tensors:
            hf_name, _ = gguf.hf_tensor_name(self.config.model_type, t.name, n_layers)
            if hf_name is None:
                continue
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            if len(shape) > 1:
                kinds.append(own.get(t.tensor_type, torch.float16))
            self.tensors.append(TensorInfo(hf_name, shape, torch.float32))
        self.default_dtype = kinds[0] if kinds and all(k == kinds[0] for k in kinds) else torch.float16

    def read(self, dtype):
        from . import gguf

        dtype = dtype or self.default_dtype
        yield from gguf.iter_gguf_tensors(self._reader, self.config.raw, dtype)

    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer.from_gguf_metadata(self.meta)

    def write_tokenizer_files(self, folder):
        tok = self.tokenizer()
        (folder / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
                                  "add_eos_token": bool(self.meta.get("tokenizer.ggml.add_eos_token", False)),
                                  "clean_up_tokenization_spaces": False,
                                  "model_max_length": self.config.max_position_embeddings}
        for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            i = self.meta.get(f"tokenizer.ggml.{gguf_key}")
            if i is not None and tok.id_to_token(int(i)) is not None:
                config[key] = tok.id_to_token(int(i))
        if tok.chat_template:
            config["chat_template"] = tok.chat_template
        _write_json(folder / "tokenizer_config.json", config)
        _write_json(folder / "generation_config.json", _generation_config(self.config, tok))

    def gguf_vocab(self):
        return {k: v for k, v in self.meta.items() if k.startswith("tokenizer.")}


def _safetensors_index(path: Path) -> list[tuple[TensorInfo, int, int]]:
    """(tensor, absolute byte offset, byte count) for each tensor of a safetensors file, in file order."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path.name} is not a safetensors file (bad header size)",
                                      hint="the file may be truncated; download it again")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name} has a corrupt safetensors header: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_NAMES.get(entry.get("dtype"))
        if dtype is None:
            raise UnsupportedError(f"tensor '{name}' in {path.name} has dtype {entry.get('dtype')}, which is not supported")
        try:
            begin, end = (int(o) for o in entry["data_offsets"])
            info = TensorInfo(name, tuple(int(d) for d in entry["shape"]), dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"tensor '{name}' in {path.name} has a malformed header entry: {e}") from None
        if end - begin != info.numel * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(f"tensor '{name}' in {path.name} lies outside the file or has the wrong size",
                                  hint="the file is truncated or corrupt; download it again")
        out.append((info, 8 + n + begin, end - begin))
    out.sort(key=lambda e: e[1])
    return out


def _spm_tokenizer(model_file: Path, folder: Path | None):
    """A core Tokenizer from a sentencepiece model (plus tokenizer_config.json when the folder has one)."""
    from . import sentencepiece as sp
    from .tokenizer import Tokenizer

    m = sp.read_model(model_file)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(sp.to_backend(m).to_str(), encoding="utf-8")
        own = folder / "tokenizer_config.json" if folder else None
        config = json.loads(own.read_text(encoding="utf-8")) if own and own.is_file() else sp.tokenizer_config(m)
        _write_json(Path(tmp) / "tokenizer_config.json", config)
        return Tokenizer.from_folder(tmp)


def _generation_config(config: ModelConfig, tokenizer=None) -> dict[str, Any]:
    eos = list(dict.fromkeys([*config.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]))
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return {k: v for k, v in out.items() if v not in (None, [])}


def open_checkpoint(ref: str, *, progress: bool = False) -> Checkpoint:
    """Open `ref` as a conversion source: a Meta-layout folder, an HF folder / Hub repo, or a GGUF file.

    progress: show Hub download progress (on stderr, by huggingface_hub).
    """
    from . import meta_llama

    path = Path(ref).expanduser()
    if path.is_dir() and meta_llama.is_meta_layout(path):
        return meta_llama.MetaCheckpoint(path)
    if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise InputError(
            f"{path} is not a model folder this tool can read (found: {', '.join(found) or 'nothing'})",
            hint="expected an HF folder (config.json + *.safetensors), a .gguf file, or Meta's layout "
                 "(params.json + consolidated.*.pth + tokenizer.model)",
        )
    if path.is_file() and path.suffix != ".gguf":
        raise InputError(f"{path} is not a model file this tool can read",
                         hint="give a .gguf file, or the folder holding the checkpoint")
    resolved = resolve_model(ref, progress=progress)
    if resolved.kind == "gguf":
        return GGUFCheckpoint(resolved.path)
    if not resolved.path.is_dir():
        raise ModelNotFoundError(f"no model at {resolved.path}")
    return HFCheckpoint(resolved.path)


# --------------------------------------------------------------------------------------------- convert


def convert(spec: ConvertSpec, progress: ProgressFn | None = None) -> ConvertResult:
    """Convert `spec.source` into `spec.output`; see the module docstring."""
    t0 = time.perf_counter()
    if spec.to not in TARGETS:
        raise InputError(f"unknown target format '{spec.to}'", hint=f"use one of: {', '.join(TARGETS)}")
    if spec.to == "gguf" and spec.outtype not in GGUF_OUTTYPES:
        raise InputError(f"unknown GGUF outtype '{spec.outtype}'", hint=f"use one of: {', '.join(GGUF_OUTTYPES)}")
    if spec.to == "gguf" and spec.dtype is not None:
        raise InputError("--dtype applies to --to hf", hint="for GGUF output choose --outtype f32|f16|bf16|q8_0")
    dtype = _target_dtype(spec.dtype)
    if spec.max_shard_size <= 0:
        raise InputError("--max-shard-size must be positive")
    output = Path(spec.output).expanduser().absolute()
    if spec.to == "gguf" and (output.suffix != ".gguf" or output.is_dir()):
        raise InputError(f"GGUF output {output} must be a file path ending in .gguf", hint="e.g. -o model.f16.gguf")
    checkpoint = open_checkpoint(spec.source, progress=progress is not None)
    try:
        _check_output(output, checkpoint.path, spec.force)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
            _chmod_default(staging)
        except OSError as e:
            raise _os_error(e, output) from None
        try:
            if spec.to == "hf":
                target = staging
                count, written = write_hf_folder(checkpoint, staging, dtype, spec.max_shard_size, progress)
                resolved = ResolvedModel(str(output), "folder", staging)
            else:
                from . import gguf_writer

                target = staging / output.name
                count, written = gguf_writer.write_gguf(checkpoint, target, spec.outtype, progress)
                resolved = ResolvedModel(str(output), "gguf", target)
            diff = tolerance = None
            if spec.verify:
                # Checked before the rename: a conversion that fails verification never appears.
                diff, scale = verify_logits(checkpoint, resolved)
                tolerance = _TOLERANCE[spec.outtype if spec.to == "gguf" else _dtype_name(dtype, checkpoint)] * scale
                if not diff <= tolerance:
                    raise CheckpointError(
                        f"verification failed: logits differ from the source by {diff:.3g} (tolerance {tolerance:.3g})",
                        hint="the converted model is wrong; report this with the source model's name",
                    )
            _publish(target, output)
        except OSError as e:
            raise _os_error(e, output) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        checkpoint.close()
    return ConvertResult(output, count, written, time.perf_counter() - t0, diff, tolerance, tuple(checkpoint.warnings))


def _target_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise InputError(f"unknown dtype '{name}'", hint="use float32, bfloat16 or float16")
    return DTYPES[key]


def _dtype_name(dtype: torch.dtype | None, checkpoint: Checkpoint) -> str:
    chosen = dtype or checkpoint.default_dtype
    if chosen is None:  # each tensor keeps its own: the loosest of them decides
        kinds = {t.dtype for t in checkpoint.tensors}
        chosen = torch.bfloat16 if torch.bfloat16 in kinds else torch.float16 if torch.float16 in kinds else torch.float32
    return str(chosen).removeprefix("torch.")


def _check_output(output: Path, source: Path, force: bool) -> None:
    src = source.resolve()
    out = output.resolve()
    if out == src or src.is_relative_to(out) or (src.is_dir() and out.is_relative_to(src)):
        raise InputError(f"the output {output} overlaps the source {source}", hint="choose an output outside the source")
    if output.exists() or output.is_symlink():
        if not force:
            raise InputError(f"{output} already exists", hint="pass --force to replace it")
    if not output.parent.is_dir():
        raise InputError(f"the folder {output.parent} does not exist", hint="create it first")


def _publish(staged: Path, output: Path) -> None:
    """Move the finished output into place; an existing one (--force) is removed only after that worked."""
    old = None
    if output.exists() or output.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent)) / output.name
        os.replace(output, old)
    try:
        os.replace(staged, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _chmod_default(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); the published output gets the usual umask permissions.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


def _os_error(e: OSError, output: Path) -> LLMError:
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return ResourceError(f"no space left on the device writing {output}; the partial output was removed",
                             hint="free disk space or write to another folder with -o")
    return InputError(f"cannot write {output}: {e.strerror or e}", hint="check the output folder's permissions")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- HF writer


def write_hf_folder(checkpoint: Checkpoint, folder: Path, dtype: torch.dtype | None, max_shard_size: int,
                    progress: ProgressFn | None = None) -> tuple[int, int]:
    """config.json, safetensors shards (+ index), tokenizer and generation files into `folder`.

    Returns (tensor count, bytes of tensor data written).
    """
    dtype = dtype or checkpoint.default_dtype
    out = [TensorInfo(t.name, t.shape, dtype or t.dtype) for t in checkpoint.tensors]
    shards = _plan_shards(out, max_shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    total = sum(t.numel * t.dtype.itemsize for t in out)
    done = 0
    tensors = checkpoint.read(dtype)
    for shard, name in zip(shards, names):
        done = _write_safetensors(folder / name, shard, tensors, done, total, progress)
    if len(shards) > 1:
        weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
        _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(checkpoint.config_dict)
    kinds = {t.dtype for t in out}
    if len(kinds) == 1:
        dtype_name = str(next(iter(kinds))).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    _write_json(folder / "config.json", config)
    checkpoint.write_tokenizer_files(folder)
    return len(out), total


def _plan_shards(tensors: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        n = t.numel * t.dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def _write_safetensors(path: Path, infos: list[TensorInfo], tensors: Iterator[tuple[str, torch.Tensor]],
                       done: int, total: int, progress: ProgressFn | None) -> int:
    """One safetensors file, header first (offsets are known from the shapes), then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in infos:
        n = t.numel * t.dtype.itemsize
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for info in infos:
            name, tensor = next(tensors)
            if name != info.name or tuple(tensor.shape) != info.shape:
                raise CheckpointError(f"tensor '{name}' {tuple(tensor.shape)} came where '{info.name}' {info.shape} "
                                      "was expected", hint="the checkpoint changed while it was read")
            write_tensor_bytes(f, tensor.to(info.dtype))
            done += info.numel * info.dtype.itemsize
            del tensor
            if progress is not None:
                progress(done, total, name)
    return done


def write_tensor_bytes(f, tensor: torch.Tensor) -> None:
    """A tensor's raw little-endian bytes, without a Python-side copy of a contiguous tensor."""
    t = tensor.detach().contiguous().reshape(-1)
    if t.numel():
        f.write(memoryview(t.view(torch.uint8).numpy()))


# --------------------------------------------------------------------------------------------- verify


def verify_logits(checkpoint: Checkpoint, output: ResolvedModel) -> tuple[float, float]:
    """(max |logits difference|, max |source logits|) on a fixed prompt, both models in float32."""
    from .loading import assign_weights, build_model, load_resolved

    tok = None
    try:
        tok = checkpoint.tokenizer()
    except LLMError:
        pass
    ids = tok.encode(_VERIFY_TEXT) if tok is not None else []
    vocab = checkpoint.config.vocab_size
    ids = [i for i in ids if i < vocab][:32] or [i % vocab for i in range(1, 17)]
    x = torch.tensor([ids])
    source = build_model(checkpoint.config, fused=True)
    assign_weights(source, checkpoint.read(torch.float32), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = _as_tensor(source(x))
        del source
        converted = load_resolved(output, dtype=torch.float32, with_tokenizer=False).model
        got = _as_tensor(converted(x))
    return float((expected - got).abs().max()), float(expected.abs().max())


def _as_tensor(out) -> torch.Tensor:
    return torch.stack(out) if isinstance(out, tuple) else out
