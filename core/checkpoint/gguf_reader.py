"""llama.cpp GGUF files at the byte level: open (memory-mapped, fast metadata parsing), metadata as
plain values, tensors dequantized to torch one at a time. core/checkpoint/gguf.py maps them to HF terms.

torch is imported by the functions that make tensors: opening a file and reading its metadata (the config and
tokenizer of llm tokenize, template, visualize-mask) stays torch-free."""

from __future__ import annotations

import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize as _gguf_dequantize

from llm_torch.core.errors import CheckpointError, UnsupportedError

if TYPE_CHECKING:
    import torch

_U64 = struct.Struct("=Q")  # GGUF string lengths, in the file's (here: host) byte order
# The fewest bytes one entry can take, so a count can be checked against the bytes left before any loop:
# a key/value (key length u64, value type u32, a 1-byte value) and a tensor info (name length u64,
# n_dims u32, type u32, offset u64).
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 13, 24
_MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFHeaderError(ValueError):
    """A count or size in a GGUF header that the file cannot hold (open_gguf's "truncated or corrupt")."""


class _FastGGUFReader(GGUFReader):
    """GGUFReader with the same fields, parts and tensors, parsed ~15x faster.

    The stock reader builds every array element (49k tokens, 49k merges...) through a generic
    per-value path on np.memmap slices, ~20 us each: 2.8 s to open SmolLM2, several s for 256k vocabs.
    Only the private _get/_get_field_parts are replaced; tests compare the result with the stock reader.

    With `plain_arrays` (open_gguf's), arrays become Python lists in `arrays` (keyed by the array's offset;
    strings as memoryviews of the map, for gguf_metadata to decode) instead of one or two numpy views per item
    in `fields` (their field then lists no items): less CPU at every start, and no ~25 MB of views at its peak.
    """

    def __init__(self, path: str, plain_arrays: bool = False):
        self.plain_arrays = plain_arrays
        self.arrays: dict[int, list] = {}
        super().__init__(path)

    def _plain(self) -> np.ndarray:
        # Slices of an np.memmap run a Python-level __array_finalize__; a plain view of it does not.
        buf = self.__dict__.get("_plain_buf")
        if buf is None:
            buf = self._plain_buf = self.data.view(np.ndarray)
        return buf

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        arr = self._plain()[offset : offset + itemsize * count].view(dtype)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

    def _check_count(self, what: str, count: int, min_bytes: int, offs: int) -> None:
        left = len(self.data) - offs
        if count * min_bytes > left:
            raise GGUFHeaderError(f"{what} {count} needs at least {count * min_bytes} bytes, {left} are left in the file")

    def _build_fields(self, offs: int, count: int) -> int:
        self._check_count("kv_count", int(count), _MIN_KV_BYTES, offs)
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        self._check_count("tensor_count", int(count), _MIN_TENSOR_INFO_BYTES, offs)
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs: int) -> Any:
        field = super()._get_tensor_info_field(orig_offs)
        _, name, n_dims, dims = field.parts[:4]
        label = bytes(name).decode("utf-8", "replace")
        if not 1 <= int(n_dims[0]) <= _MAX_DIMS or len(dims) != int(n_dims[0]):
            raise GGUFHeaderError(f"tensor '{label}' has {int(n_dims[0])} dims, not 1..{_MAX_DIMS}")
        # Python ints: numpy's uint64 product wraps around and would hide an absurd shape.
        elements = 1
        for d in dims.tolist():
            elements *= int(d)
        if elements > 8 * len(self.data):  # no ggml type stores an element in under one bit
            raise GGUFHeaderError(f"tensor '{label}' has shape {dims.tolist()} ({elements} elements), "
                                  f"more than a file of {len(self.data)} bytes can hold")
        return field

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(int(raw_itype[0]))
        count = int(alen[0])
        offs = orig_offs + 12
        self._check_count("array length", count, 8 if itype == GGUFValueType.STRING else 1, offs)
        parts: list[np.ndarray] = [raw_itype, alen]
        types: list[Any] = [GGUFValueType.ARRAY] + ([itype] if count else [])
        nptype = self.gguf_scalar_to_np.get(itype)
        if itype == GGUFValueType.STRING and self.plain_arrays:
            view = memoryview(self._plain())
            values = []
            for at, start, end in _string_spans(view, offs, count):
                values.append(view[start:end])
                offs = end
            self.arrays[orig_offs] = values
            data = []
        elif itype == GGUFValueType.STRING:
            buf = self._plain()
            for at, start, end in _string_spans(buf, offs, count):
                parts.append(buf[at:start].view(np.uint64))
                parts.append(buf[start:end])
                offs = end
            # Same layout as the stock reader: [type, count, len0, str0, len1, str1, ...].
            data = list(range(3, 3 + 2 * count, 2))
        elif nptype is not None:
            block = self._get(offs, nptype, count)
            if len(block) != count:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            if self.plain_arrays:
                self.arrays[orig_offs] = block.tolist()
                data = []
            else:
                parts.extend(block.reshape(count, 1))  # one 1-element view per item, as the stock reader has
                data = list(range(2, 2 + count))
            offs += block.nbytes
        else:  # nested arrays: rare, leave them to the stock code path
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, data, types


def open_gguf(path: str | os.PathLike[str], *, plain_arrays: bool = False) -> GGUFReader:
    """Memory-map a GGUF file; raise CheckpointError if it is missing, not GGUF, or truncated.

    plain_arrays: arrays (the vocabulary) only for gguf_metadata, not as fields (_FastGGUFReader)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic)", hint="expected a llama.cpp .gguf file")
    try:
        return _FastGGUFReader(path, plain_arrays)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error) as e:
        # The reader slices the mmap; a short file shows up as a short slice, a bad view or reshape.
        raise CheckpointError(
            f"{path} is truncated or corrupt: {e}", hint="re-download the file; partial downloads look like this"
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e.strerror or e}") from None


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every metadata key of the file -> plain Python value (str, int, float, bool or list of those).

    The reader's own header pseudo-keys ("GGUF.version", ...) are left out.
    """
    arrays = getattr(reader, "arrays", {})
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        # A plain_arrays reader's array: it starts after the key's length, key and value type.
        plain = arrays.get(field.offset + sum(int(p.nbytes) for p in field.parts[:3])) if arrays else None
        if plain is None:
            out[name] = _field_value(field)
        elif field.types[-1] == GGUFValueType.STRING:
            out[name] = [_decode(s, name) for s in plain]
        else:
            out[name] = plain
    return out


def release_fields(reader: GGUFReader) -> None:
    """Drop the reader's parsed metadata fields once gguf_metadata has copied them out.

    They hold two numpy views per vocabulary string (~36 MB of Python objects for SmolLM2's 49k
    tokens + 49k merges; a plain_arrays reader: one memoryview each) that would otherwise stay alive through
    the weight load and add to peak RSS. The tensors (and their mapped data) are kept; `reader.fields` is
    empty afterwards.
    """
    reader.fields.clear()
    getattr(reader, "arrays", {}).clear()


def _field_value(field: Any) -> Any:
    main = field.types[0] if field.types else None
    if main == GGUFValueType.STRING:
        return _decode(field.parts[field.data[0]], field.name)
    if main != GGUFValueType.ARRAY:
        return field.parts[field.data[0]].tolist()[0]
    if len(field.types) == 1 or not field.data:
        return []
    sub = field.types[1]
    if sub == GGUFValueType.STRING:
        return [_decode(field.parts[i], field.name) for i in field.data]
    if sub == GGUFValueType.ARRAY:
        return field.contents()
    # One contiguous numpy array then one tolist(): ~100x faster than per-element conversion.
    return np.concatenate([field.parts[i] for i in field.data]).tolist()


def _decode(raw: np.ndarray | memoryview, key: str) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"GGUF metadata '{key}' holds a string that is not UTF-8: {e}") from None


def release_pages(reader: GGUFReader, t: Any) -> None:
    """Drop the mapped file pages of a tensor already decoded, so they do not add to peak RSS.

    They are clean file-backed pages: a later read just faults them in again from the file.
    """
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's own mmap object
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = int(t.data_offset) + int(t.n_bytes)
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)



# Elements dequantized at a time (whole rows, at least one): bounds the fp32 temporaries to ~0.5 MB.
# Small enough that glibc reuses the same freed block for every chunk; with 4096-row chunks (9 MB for
# SmolLM2's embedding) the holes they left between weights added ~25 MB to peak RSS. Same speed.
_CHUNK_ELEMENTS = 1 << 17


def dequantize(t: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of its logical shape in `dtype` (default float32; the types without a
    torch decoder here via gguf-py: float32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    # GGUF lists dims innermost first (ne0 = row length); torch wants them outermost first.
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    qtype = t.tensor_type
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16) or qtype in _TORCH_DEQUANT:
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = np.asarray(t.data).reshape(rows, -1)
        out = torch.empty(rows, shape[-1], dtype=dtype)
        step = max(1, _CHUNK_ELEMENTS // shape[-1])
        for start in range(0, rows, step):
            out[start : start + step] = _rows(data[start : start + step], qtype).reshape(-1, shape[-1])
        return out.reshape(shape)
    try:
        out = torch.from_numpy(_gguf_dequantize(t.data, qtype))
    except NotImplementedError:
        raise UnsupportedError(
            f"GGUF tensor '{t.name}' uses type {qtype.name}, which cannot be dequantized",
            hint="use a GGUF with F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 or K-quant tensors",
        ) from None
    return out.reshape(shape)


def raw_rows(t: Any) -> torch.Tensor:
    """A quantized matrix's blocks as stored: uint8 [rows, row bytes] (a copy: the reader's arrays map the file)."""
    import torch

    rows = int(t.shape[1])
    return torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, -1))


def _rows(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """Some whole rows of a tensor's raw data, decoded (F16/BF16 kept as is, the rest float32)."""
    import torch

    # np.array copies: the reader's arrays are read-only views of the mmap.
    if qtype == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if qtype == GGMLQuantizationType.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16))
    if qtype == GGMLQuantizationType.BF16:
        # gguf-py exposes BF16 as raw bytes (rows, 2 * cols); reinterpret them.
        return torch.from_numpy(np.array(data, dtype=np.uint8)).view(torch.bfloat16)
    return _TORCH_DEQUANT[qtype](torch.from_numpy(np.array(data, dtype=np.uint8)))


# Vectorised torch versions of ggml's block formats (ggml-common.h; most in core/model/gguf_quant.py), bit-exact
# with gguf.quants (same float32 ops in the same order) and ~2-4x faster: its numpy code works 16 rows at a time.


def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(-1, block_bytes)


def _dq_q8_k(raw: torch.Tensor) -> torch.Tensor:
    import torch

    # block_q8_K: f32 d, int8 qs[256], int16 bsums[16] (sums only speed up dot products); x = qs * d
    b = _blocks(raw, 292)
    d = b[:, :4].view(torch.float32)
    out = torch.empty(b.shape[0], 256)
    out.copy_(b[:, 4:260].view(torch.int8))
    return out.mul_(d)


def kernel_kinds() -> dict[GGMLQuantizationType, int]:
    """The block types core/model/gguf_quant.py decodes (and the loader may keep packed) -> the kernels' kind codes."""
    from llm_torch.core import kernels

    Q = GGMLQuantizationType
    return {Q.Q4_0: kernels.Q4_0, Q.Q4_1: kernels.Q4_1, Q.Q8_0: kernels.Q8_0,
            Q.Q4_K: kernels.Q4_K, Q.Q5_K: kernels.Q5_K, Q.Q6_K: kernels.Q6_K}


def _dq_kind(qtype: GGMLQuantizationType) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode(raw: torch.Tensor) -> torch.Tensor:
        from llm_torch.core.model.gguf_quant import FORMATS

        _, nbytes, blocks = FORMATS[kernel_kinds()[qtype]]
        return blocks(raw.reshape(-1, nbytes))
    return decode


_TORCH_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    **{q: _dq_kind(q) for q in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
                                GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)},
    GGMLQuantizationType.Q8_K: _dq_q8_k,
}


def _string_spans(buf, offs: int, count: int):
    """(length field offset, start, end) of `count` consecutive length-prefixed strings from `offs`, each
    checked against the end of the file before it is read."""
    size, unpack = len(buf), _U64.unpack_from
    for _ in range(count):
        start = offs + 8
        end = start + unpack(buf, offs)[0]
        if end > size:
            raise ValueError(f"string in array at offset {offs} runs past the end of the file")
        yield offs, start, end
        offs = end
