"""The one safetensors reader and writer: headers parsed here, tensor bytes read with plain file reads.

Plain reads into a fresh buffer rather than a memory map: the mapped pages of a whole shard would stay
resident and count towards peak RSS; this way one tensor is in memory at a time. The writer streams too
(header first, from the shapes, then each tensor as it comes), which safetensors' own save_file cannot:
it takes every tensor of the file at once. `llm convert` and `llm quantize` both write through it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from llm_torch.core.errors import CheckpointError, UnsupportedError
from .base import Select, TensorInfo

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
               torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit


def name_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: the shard index's files, model.safetensors, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {name_list(absent)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [folder / n for n in others]
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({name_list(pickles)}), which are not loaded for safety",
            hint="convert them to safetensors first",
        )
    raise CheckpointError(f"no model.safetensors in {folder}", hint="a model folder needs safetensors weights")


def read_index(path: Path) -> list[tuple[TensorInfo, int, int]]:
    """(tensor, absolute byte offset, byte count) for each tensor of a safetensors file, in file order."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path.name} is not a safetensors file (bad header size)",
                                      hint="the file may be truncated; download it again")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name} has a corrupt safetensors header: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header")
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"tensor '{name}' in {path.name} has a malformed header entry",
                                  hint="the file is corrupt; download it again")
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise UnsupportedError(f"tensor '{name}' in {path.name} has dtype {entry.get('dtype')}, which is not supported")
        try:
            begin, end = (int(o) for o in entry["data_offsets"])
            info = TensorInfo(name, tuple(int(d) for d in entry["shape"]), dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"tensor '{name}' in {path.name} has a malformed header entry: {e}") from None
        if any(d < 0 for d in info.shape):
            raise CheckpointError(f"tensor '{name}' in {path.name} has a negative dimension {info.shape}",
                                  hint="the file is corrupt; download it again")
        if end - begin != info.numel * dtype.itemsize or begin < 0 or 8 + n + end > size:
            raise CheckpointError(f"tensor '{name}' in {path.name} lies outside the file or has the wrong size",
                                  hint="the file is truncated or corrupt; download it again")
        out.append((info, 8 + n + begin, end - begin))
    out.sort(key=lambda e: e[1])
    return out


def _leading_rows(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(first, stop) when `index` keeps whole rows of dim 0 only: that part is one contiguous byte range."""
    if not index or any(s != slice(None) for s in index[1:]):
        return None
    start, stop, step = index[0].indices(shape[0])
    return (start, stop) if step == 1 else None


def read_tensors(entries: list[tuple[Path, TensorInfo, int, int]], dtype: torch.dtype | None,
                 select: Select | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each (file, info, offset, nbytes) entry; `select` reads a part (see base.Select)."""
    handles: dict[Path, Any] = {}
    try:
        for file, info, offset, nbytes in entries:
            f = handles.get(file)
            if f is None:
                for old in handles.values():
                    old.close()
                try:
                    f = open(file, "rb")
                except OSError as e:
                    raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
                handles = {file: f}
            shape, index = info.shape, None if select is None else select(info.name, info.shape)
            rows = _leading_rows(index, shape) if index is not None else None
            if rows is not None:  # a dim-0 part (column-parallel rank): read only its bytes
                row_bytes = nbytes // max(1, shape[0])
                offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
                shape, index = (rows[1] - rows[0], *shape[1:]), None
            buf = torch.empty(nbytes, dtype=torch.uint8)
            try:
                f.seek(offset)
                got = f.readinto(memoryview(buf.numpy())) if nbytes else 0
            except OSError as e:
                raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
            if got != nbytes:
                raise CheckpointError(f"{file.name} ends inside tensor '{info.name}'",
                                      hint="the file is truncated; download it again")
            t = buf.view(info.dtype).reshape(shape)
            if index is not None:
                t = t[index].contiguous()
            yield info.name, t if dtype is None else t.to(dtype)
    finally:
        for f in handles.values():
            f.close()


def write_safetensors(path: Path, infos: list[TensorInfo], tensors: Iterator[tuple[str, torch.Tensor]],
                      done: int, total: int, progress: Callable[[int, int, str], None] | None) -> int:
    """One safetensors file, header first (offsets are known from the shapes), then each tensor's bytes.

    Takes the next len(infos) tensors of the stream; returns `done` plus the bytes written."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in infos:
        n = t.numel * t.dtype.itemsize
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
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


def save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors already in memory (any device; views sharing storage welcome) as one safetensors file."""
    infos = [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    write_safetensors(path, infos, iter(tensors.items()), 0, 0, None)


def write_tensor_bytes(f, tensor: torch.Tensor) -> None:
    """A tensor's raw little-endian bytes, without a Python-side copy of a contiguous CPU tensor."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    if t.numel():
        f.write(memoryview(t.view(torch.uint8).numpy()))
