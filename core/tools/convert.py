"""`llm convert`: any checkpoint the loader reads (HF folder / Hub repo, GGUF file, Meta's original
Llama layout) -> a Hugging Face folder (sharded safetensors) or a GGUF file.

    result = convert(ConvertSpec(source="smollm2", output=Path("out")), progress=callback)

Tensors stream one at a time, source to output: each is read (memory-mapped), converted to HF
layout and the target dtype, written, and dropped. The output is built in a temporary folder next
to it and renamed into place only when complete, so a failed or interrupted run leaves nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llm_torch.core.checkpoint import Checkpoint, ResolvedModel, TensorInfo, open_checkpoint, resolve_model
from llm_torch.core.checkpoint.base import write_json
from llm_torch.core.checkpoint.resolve import is_meta_layout
from llm_torch.core.checkpoint.safetensors import write_safetensors
from llm_torch.core.errors import CheckpointError, InputError, LLMError, ModelNotFoundError
from llm_torch.core.files import staged_output
from llm_torch.core.placement.loading import DTYPE_ALIASES, DTYPES

# progress(done_bytes, total_bytes, tensor_name): called after each tensor is written.
ProgressFn = Callable[[int, int, str], None]

TARGETS = ("hf", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default ("5GB")
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


def open_source(ref: str, *, progress: bool = False) -> Checkpoint:
    """Open `ref` as a conversion source: a Meta-layout folder, an HF folder / Hub repo, or a GGUF file,
    with a clear error for a folder or file that is none of those.

    progress: show Hub download progress (on stderr, by huggingface_hub).
    """
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and not is_meta_layout(path) \
            and not any(path.glob("*.gguf")):
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
    if resolved.kind == "folder" and not resolved.path.is_dir():
        raise ModelNotFoundError(f"no model at {resolved.path}")
    return open_checkpoint(resolved)


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
    checkpoint = open_source(spec.source, progress=progress is not None)
    try:
        _check_output(output, checkpoint.path, spec.force)
        with staged_output(output, replace=spec.force, is_file=spec.to == "gguf") as target:
            if spec.to == "hf":
                count, written = write_hf_folder(checkpoint, target, dtype, spec.max_shard_size, progress)
                resolved = ResolvedModel(str(output), "folder", target)
            else:
                from llm_torch.core.checkpoint import gguf_writer

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
        done = write_safetensors(folder / name, shard, tensors, done, total, progress)
    if len(shards) > 1:
        weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
        write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(checkpoint.config_dict)
    kinds = {t.dtype for t in out}
    if len(kinds) == 1:
        dtype_name = str(next(iter(kinds))).removeprefix("torch.")
        config["torch_dtype"] = dtype_name
        if "dtype" in config:
            config["dtype"] = dtype_name
    write_json(folder / "config.json", config)
    checkpoint.write_tokenizer_files(folder)
    _write_sampling(folder, checkpoint.generation_config())
    return len(out), total


def _write_sampling(folder: Path, source: dict) -> None:
    """generation_config.json gets the sampling the source runs with (llm's defaults for a GGUF or Meta
    source, a built-in model's own settings), so the same weights answer alike in both formats."""
    from llm_torch.core.engine.sampling_spec import sampling_in_effect

    path = folder / "generation_config.json"
    written = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    merged = {**written, **sampling_in_effect(source)}
    if merged != written:  # a copied generation_config.json already says it: left byte for byte
        write_json(path, merged)


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


# --------------------------------------------------------------------------------------------- verify


def verify_logits(checkpoint: Checkpoint, output: ResolvedModel) -> tuple[float, float]:
    """(max |logits difference|, max |source logits|) on a fixed prompt, both models in float32."""
    from llm_torch.core.placement.loading import assign_weights, build_model, load_resolved

    tok = None
    try:
        tok = checkpoint.tokenizer()
    except LLMError:
        pass
    ids = tok.encode(_VERIFY_TEXT) if tok is not None else []
    vocab = checkpoint.config.vocab_size
    ids = [i for i in ids if i < vocab][:32] or [i % vocab for i in range(1, 17)]
    x = torch.tensor([ids])
    source = build_model(checkpoint.config)
    assign_weights(source, checkpoint.read(torch.float32), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = _as_tensor(source(x))
        del source
        converted = load_resolved(output, dtype=torch.float32, with_tokenizer=False).model
        got = _as_tensor(converted(x))
    return float((expected - got).abs().max()), float(expected.abs().max())


def _as_tensor(out) -> torch.Tensor:
    return torch.stack(out) if isinstance(out, tuple) else out
