"""What the CLI calls: quantize a loaded model, write a quantized copy, estimate one (--dry-run)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llm_torch.core.errors import InputError

from .swap import QuantResult, has_tied_head, applied_label, codec_for, float_tensors, plan, quantize_model
from .spec import QuantSpec


def quantize_loaded(loaded, spec: QuantSpec, *, collect: bool = False,
                    progress: Callable[[int, int, str], None] | None = None) -> QuantResult:
    """Quantize a LoadedModel's model in place (`--quantize` at load time).

    progress(done, total, layer name): after each layer, on the CPU path."""
    if loaded.config.quantization_config is not None or loaded.quantization is not None:
        # (GGUF blocks loaded packed: load with packed=False to quantize the decoded weights)
        raise InputError(f"{loaded.name} is already quantized", hint="drop --quantize, or start from the float model")
    device = next(loaded.model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        from llm_torch.core.errors import UnsupportedError

        raise UnsupportedError(f"quantized layers run on the CPU and on CUDA GPUs, not on {device.type}",
                               hint="use --device cpu (or a CUDA GPU)")
    with torch.no_grad():
        if device.type == "cuda":
            from .cuda import quantize_on_cuda

            result = quantize_on_cuda(loaded.model, spec)  # torchao / bitsandbytes' own CUDA layers
        else:
            result = quantize_model(loaded.model, spec, collect=collect, progress=progress)
    if not result.quantized:
        raise InputError(f"no layer was quantized (skipped: {', '.join(spec.skip)})", hint="check the --skip patterns")
    loaded.quantization = result.label
    return result


def default_output(model_name: str, label: str) -> Path:
    """./<model-name>-<scheme as applied>: smollm2-int4-g64-g128, Llama-2-7b-hf-nf4 ..."""
    base = model_name.rstrip("/").split("@")[0]
    stem = Path(base).name or "model"
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    return Path(f"{stem}-{label}")


@dataclass
class QuantizeOutcome:
    out: Path
    result: QuantResult
    seconds: float
    bytes_on_disk: int


def quantize_to_folder(ref: str | None, spec: QuantSpec, out: Path | None, *, dtype: str = "auto",
                       force: bool = False, progress: Callable[[int, int, str], None] | None = None) -> QuantizeOutcome:
    """Load the float model, quantize it and write a folder any `llm` command opens.

    progress(done, total, layer name): after each layer is quantized; the folder is written after the last."""
    from llm_torch.core.placement.loading import load_resolved, resolve_model

    from .save import check_destination, save_quantized

    t0 = time.perf_counter()
    resolved = resolve_model(ref)
    if out is None:  # named by the group sizes the layers will get, known from the config alone
        _, todo, _, _ = _meta_plan(resolved, spec)
        out = default_output(resolved.name, applied_label(spec, todo))
    out = Path(out)
    check_destination(out, force)  # before minutes of work
    # A folder's tokenizer files are copied as they are; a GGUF's tokenizer is rebuilt from its metadata.
    loaded = load_resolved(resolved, dtype=dtype, device="cpu", with_tokenizer=resolved.kind == "gguf", packed=False)
    result = quantize_loaded(loaded, spec, collect=True, progress=progress)
    tensors = {**float_tensors(loaded.model), **result.tensors}
    codec = codec_for(spec)
    save_quantized(
        out,
        config_raw={**loaded.config.raw, "llm_torch_quantized_from": _source_ref(ref, resolved)},
        tensors=tensors,
        quantization_config=codec.config(spec, sorted(set(result.kept) | set(_skip_names(spec)))),
        dtype=loaded.dtype,
        source_folder=resolved.path if resolved.kind == "folder" else None,
        tokenizer=loaded.tokenizer,
        generation_config=loaded.generation_config,
        force=force,
    )
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return QuantizeOutcome(out, result, time.perf_counter() - t0, size)


def _source_ref(ref: str | None, resolved) -> str:
    """What `llm quantize --report` reloads as the float model: an alias or Hub id as given, a local path absolute."""
    if ref is None or not Path(ref).exists():
        return resolved.name
    return str(Path(ref).resolve())


def _skip_names(spec: QuantSpec) -> list[str]:
    return [p for p in spec.skip if not any(c in p for c in "*?[")]


@dataclass
class Estimate:
    float_bytes: int  # weights as loaded (the float dtype)
    quantized_bytes: int  # weights after quantization (scales included): the output's size
    memory_bytes: int  # weight memory once loaded
    quantized_layers: int  # Linears and embedding tables, as quantize_model's result.quantized counts them
    kept_layers: int
    notes: list[str] = field(default_factory=list)
    label: str = ""  # the scheme as it will be applied (swap.applied_label)


def _meta_plan(resolved, spec: QuantSpec):
    """(model on the meta device, then swap.plan's targets, kept targets and notes): nothing is read or allocated."""
    from llm_torch.core.checkpoint import open_checkpoint
    from llm_torch.core.placement.loading import build_model

    model = build_model(open_checkpoint(resolved).config)
    return (model, *plan(model, spec))


def estimate(ref: str | None, spec: QuantSpec, *, dtype: str = "auto") -> Estimate:
    """Output size / weight memory from the config alone (meta device: nothing is read or allocated)."""
    from llm_torch.core.checkpoint import resolve_model
    from llm_torch.core.placement.loading import resolve_dtype
    from llm_torch.core.placement.sizing import param_count, weight_bytes

    resolved = resolve_model(ref)
    model, todo, kept, notes = _meta_plan(resolved, spec)
    target = resolve_dtype(dtype, model.config, kind=resolved.kind)
    float_bytes = weight_bytes(param_count(model), target)
    codec = codec_for(spec)
    saved = tables = 0
    if spec.quantize_embeddings and codec.backend == "torchao":  # int8 rows + an fp32 scale each (swap.py)
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                n, k = m.weight.shape
                saved += n * k * torch.finfo(target).bits // 8 - (n * k + n * 4)
                tables += 1
        if has_tied_head(model):  # the head reads the embedding's table
            todo = [t for t in todo if t.name != "lm_head"]
    for t in todo:
        m = model.get_submodule(t.name)
        n, k = m.out_features, m.in_features
        saved += n * k * torch.finfo(target).bits // 8 - _quantized_bytes(codec, spec, n, k)
    # Memory holds the file's tensors as they are (quant/int_layers.py keeps one copy).
    return Estimate(float_bytes, float_bytes - saved, float_bytes - saved, len(todo) + tables, len(kept), notes,
                    applied_label(spec, todo))


def _quantized_bytes(codec, spec: QuantSpec, n: int, k: int) -> int:
    if spec.runtime_scheme == "int4":
        from .int_layers import int4_group_size

        g = int4_group_size(k, spec.group_size) or k
        return n * k // 2 + n * (k // g) * 2 * 2  # 4-bit values + bf16 scale and zero per group
    if spec.runtime_scheme in ("nf4", "fp4"):
        blocks = n * k // 64
        return n * k // 2 + (blocks if spec.double_quant else blocks * 4)
    return n * k + n * 4  # int8 + one fp32 scale per row
