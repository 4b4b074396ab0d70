"""Load a model: config + tokenizer + weights from a checkpoint (core/checkpoint/) into our modules.

Weights never pass through randomly initialised memory: the module tree is built on the meta
device and each checkpoint tensor is assigned in place as it is read (one tensor in flight).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from llm_torch.core.checkpoint import Checkpoint, ResolvedModel, embedded_model_path, open_checkpoint, resolve_model
from llm_torch.core.checkpoint.safetensors import name_list
from llm_torch.core.errors import CheckpointError, InputError, UnsupportedError
from llm_torch.core.model.config import ModelConfig, resolve_context
from llm_torch.core.model.families import family_for
from llm_torch.core.model.kv_cache import resolve_format
from llm_torch.core.phases import mark

from . import device_map as dm
from .gguf_packed import GGUFPacked, gguf_packing, packed_weight_bytes
from .memory import check_fits, plan_line
from .sizing import param_counts
from .tensor_parallel import Shard
from .weight_formats import WeightFormatLoader, weight_format_for

# The loader's public names for what a model reference resolves to (core/checkpoint/ has the details).
__all__ = ["ResolvedModel", "resolve_model", "embedded_model_path", "LoadedModel", "DTYPES", "DTYPE_ALIASES",
           "resolve_dtype", "resolve_device", "available_devices", "build_model", "head_kind", "assign_weights",
           "load_tokenizer", "load_model", "load_resolved", "LoadPlan", "plan_load", "read_tokenizer",
           "build_planned_model", "assign_checkpoint", "install_runner"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Any  # core.tokenizer.Tokenizer
    name: str
    dtype: torch.dtype
    generation_config: dict[str, Any] = field(default_factory=dict)
    device_plan: dm.DevicePlan | None = None  # with --device-map
    quantization: str | None = None  # the scheme its Linears run in (quant's label: int4-g64-g128, int8 ...)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


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
    from llm_torch.core.errors import ResourceError

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


def build_model(config: ModelConfig, head: str | None = None) -> nn.Module:
    """The module tree on the meta device (no memory, no random init); `head` from config.architectures.
    Module names are transformers' (the checkpoint's)."""
    from llm_torch.core.model.model import HEADS

    head = head or head_kind(config)
    if head not in HEADS:
        raise UnsupportedError(f"the '{head}' head is not implemented", hint=f"available: {', '.join(HEADS)}")
    with torch.device("meta"):
        return HEADS[head](config)


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
    dtype: the weights' storage dtype (None: each tensor's own).

    fast_layout: store matmul weights in the layout the device multiplies fastest (layers.k_major_weights);
    shapes and names stay those of the checkpoint, only the strides differ.
    """
    from llm_torch.core.model.layers import Linear, empty_weight, k_major_weights

    # device: one for every tensor, or a function of the parameter name (a device map's placement)
    place = (lambda _name: torch.device(device)) if not callable(device) else (lambda name: torch.device(device(name)))
    k_major = fast_layout and not callable(device) and k_major_weights(dtype, torch.device(device))
    # Matmul weights: every Linear's, and the embedding when the LM head shares it.
    matmul = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    targets = {n for n, _ in model.named_parameters()}  # tied weights appear once, under their first name
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
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = tuple(module._parameters[attr].shape)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)}, the config expects {shape}")
        k = k_major and (name in matmul or (ties and name == "model.embed_tokens.weight"))
        dev = place(name)
        data = empty_weight(shape, dtype, dev, True).copy_(tensor) if k else tensor.to(device=dev, dtype=dtype)
        module._parameters[attr] = nn.Parameter(data, requires_grad=False)
        seen.add(name)
    missing = sorted(set(targets) - seen)
    if unexpected and {f"model.{n}" for n in unexpected} <= set(missing):
        # The decoder's weights under the bare model's names (LlamaModel, Gemma2Model): there is no head.
        raise CheckpointError(
            "this checkpoint is a bare decoder (transformers' LlamaModel / Gemma2Model: no head), which serves "
            "feature extraction only; text-generation needs a *ForCausalLM checkpoint (with lm_head), the other "
            "tasks a *ForSequenceClassification / *ForTokenClassification / *ForQuestionAnswering one",
            hint="llm embed MODEL serves feature extraction; for the other tasks use the model's head checkpoint")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {name_list(unexpected)}")
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts))
    if ties:
        embed = model.model.embed_tokens
        tied_head = getattr(embed, "tied_head", None)  # packed tables (gguf_layers) make a head over their rows
        if tied_head is not None:
            model.lm_head = tied_head()
        else:
            model.lm_head.weight = embed.weight
    for name, module in model.named_modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(place(f"{name}.buffers"))
    model.train(False)  # inference mode for every submodule (dropout off)


# Where transformers' heads keep the decoder, and the head weights that the bare decoder does not use.
_BASE_PREFIXES = ("model.", "transformer.")
_HEAD_WEIGHTS = ("lm_head.", "score.", "qa_outputs.")


def base_model_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Any checkpoint's decoder weights under the bare decoder's names, its head's dropped: what
    transformers' AutoModel (LlamaModel / Gemma2Model) loads from a *ForCausalLM or other head checkpoint."""
    for name, tensor in tensors:
        if name.startswith(_HEAD_WEIGHTS):
            continue
        prefix = next((p for p in _BASE_PREFIXES if name.startswith(p)), "")
        yield name[len(prefix):], tensor


def load_tokenizer(resolved: ResolvedModel, checkpoint: Checkpoint | None = None):
    """The tokenizer of a resolved reference (tokenizer.json + configs, GGUF metadata, or tokenizer.model)."""
    return (checkpoint or open_checkpoint(resolved)).tokenizer()


def load_model(
    ref: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    head: str | None = None,
    with_tokenizer: bool = True,
    offline: bool | None = None,
    progress: bool = True,
    shard: Shard | None = None,
    context: int | None = None,
    packed: bool = True,
    kv_cache: str = "auto",
) -> LoadedModel:
    """Resolve `ref`, build the model on the meta device and fill it from the checkpoint (packed: load_resolved)."""
    resolved = resolve_model(ref, offline=offline, progress=progress)
    return load_resolved(resolved, dtype=dtype, device=device, head=head, with_tokenizer=with_tokenizer, shard=shard,
                         context=context, packed=packed, kv_cache=kv_cache)


def load_resolved(
    resolved: ResolvedModel,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    head: str | None = None,
    with_tokenizer: bool = True,
    shard: Shard | None = None,
    device_map: str | None = None,
    budgets: list[dm.DeviceBudget] | None = None,
    context: int | None = None,
    packed: bool = True,
    kv_cache: str = "auto",
) -> LoadedModel:
    """Build the model on the meta device and fill it from the checkpoint: open -> plan -> build -> assign
    weights -> install the runner, each step a function below.

    shard: a tensor_parallel.Shard: build and read only this rank's part of the split layers.
    device_map: "auto": layers over the GPUs, then the CPU (core/placement/device_map.py; `budgets` replaces this
    machine's devices, for planning tests).
    context: the KV positions per sequence the memory checks count (None: the model's context).
    packed: GGUF blocks may stay packed (plan_load); False for callers that need float Linears (--quantize).
    kv_cache: --kv-cache (kv_cache.CHOICES): what a causal LM's KV cache stores (CausalLM.kv_format).
    """
    checkpoint = open_checkpoint(resolved)
    mark("open checkpoint")
    plan = plan_load(checkpoint, dtype=dtype, device=device, head=head, shard=shard, device_map=device_map,
                     budgets=budgets, context=context, packed=packed, kv_cache=kv_cache)
    mark("plan")
    tokenizer = read_tokenizer(checkpoint, with_tokenizer)
    mark("tokenizer")
    model = build_planned_model(plan)
    mark("build model")
    quantization = assign_checkpoint(model, checkpoint, plan)
    mark("assign weights")
    install_runner(model, plan)
    if hasattr(model, "kv_cache"):
        model.kv_cache = kv_cache
    return LoadedModel(model, checkpoint.config, tokenizer, resolved.name, plan.dtype, checkpoint.generation_config(),
                       plan.placement, quantization)


@dataclass(frozen=True)
class LoadPlan:
    """What is decided before a weight is read, from the config alone: computed once (plan_load), passed
    down the loading steps, and printed by --dry-run."""

    config: ModelConfig  # what this process builds: the checkpoint's, or a tensor-parallel rank's share
    kind: str  # the checkpoint's ("folder" | "gguf" | "meta")
    dtype: torch.dtype  # the weights' storage dtype
    context: int  # KV positions per sequence the memory checks counted
    head: str  # a model.HEADS key
    device: torch.device | None  # the one device of every weight; None with a device map
    placement: dm.DevicePlan | None = None  # --device-map: each layer's device
    shard: Shard | None = None  # --tp: this rank's part
    weight_format: WeightFormatLoader | None = None  # a quantized checkpoint's loader (weight_formats.py)
    packed_kinds: frozenset[int] = frozenset()  # GGUF block kinds kept packed (gguf_packed.py)
    weight_bytes: int | None = None  # where packed: the weights' bytes (else sizing counts params x dtype)
    kv_cache: str = "auto"  # --kv-cache

    def device_of(self, name: str) -> torch.device:
        """Where the parameter `name` goes."""
        return torch.device(self.placement.device_of(name)) if self.placement is not None else self.device

    def lines(self) -> list[str]:
        """Per device: the weights and KV cache it takes, and its free memory."""
        if self.placement is not None:
            return self.placement.lines()
        return [plan_line(self.config, self.dtype, self.device, self.context, self.head, self.kv_cache,
                          quantized=self.weight_format is not None or bool(self.packed_kinds), weights=self.weight_bytes)]


def plan_load(checkpoint: Checkpoint, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
              head: str | None = None, shard: Shard | None = None, device_map: str | None = None,
              budgets: list[dm.DeviceBudget] | None = None, context: int | None = None, check: bool = True,
              packed: bool = True, kv_cache: str = "auto") -> LoadPlan:
    """The LoadPlan of an opened checkpoint (its config only: nothing is read). Refuses what cannot work
    before anything is loaded: combinations a quantized checkpoint does not support, an unknown device map
    or device, a context past the model's, and (check) weights + one context of KV cache that do not fit
    the device's free memory (a device map refuses those whatever `check` says: it cannot place them).
    packed: a GGUF's Q4_0 ... Q6_K matrices stay blocks (gguf_packed.py) with the default dtype, on the CPU, for a
    causal LM; an explicit dtype, a shard, a device map or another head decode them at load."""
    config = checkpoint.config
    head = head or head_kind(config)
    context = resolve_context(config, context)  # InputError past what the rope setup supports
    resolve_format(kv_cache, torch.float32, "cpu")  # an unknown --kv-cache fails before anything is read
    quantization_config = checkpoint.quantization_config
    weight_format = None if quantization_config is None else weight_format_for(quantization_config)
    if weight_format is not None:
        refuse_for_quantized(head, shard, device_map)
    if device_map is not None:
        placement, target = plan_device_map(config, checkpoint.kind, dtype, device_map, budgets, context, kv_cache)
        return LoadPlan(config, checkpoint.kind, target, context, head, None, placement, None, weight_format, kv_cache=kv_cache)
    dev = resolve_device(device)
    target = resolve_dtype(dtype, config, kind=checkpoint.kind, device=dev)
    local = config if shard is None else shard.local_config(config)
    kinds, size = frozenset(), None
    if (packed and checkpoint.kind == "gguf" and shard is None and head == "causal_lm"
            and (dtype is None or str(dtype).lower() == "auto")):
        # Packed where the kernels multiply the blocks (CPU); an explicit --dtype decodes at load as before.
        kinds = gguf_packing(dev)
        if kinds:
            size = packed_weight_bytes(param_counts(local, head).total, checkpoint.packed_tensors(kinds), target)
    if check and weight_format is None:  # a quantized model's size is its format's business
        check_fits(local, target, dev, context=context, head=head, weights=size, kv_cache=kv_cache)
    return LoadPlan(local, checkpoint.kind, target, context, head, dev, None, shard, weight_format, kinds, size, kv_cache)


def refuse_for_quantized(head: str, shard: Shard | None, device_map: str | None) -> None:
    """UnsupportedError for what a quantized checkpoint cannot be loaded with."""
    if head == "feature_extraction":
        raise UnsupportedError("feature extraction (llm embed) of a quantized checkpoint is not supported",
                               hint="embed with the float model it was quantized from")
    if shard is not None:
        raise UnsupportedError("--tp with a quantized checkpoint is not supported", hint="split the float model")
    if device_map is not None:
        raise UnsupportedError("--device-map with a quantized checkpoint is not supported", hint="use the float model")


def plan_device_map(config: ModelConfig, kind: str, dtype: str | torch.dtype | None, device_map: str,
                    budgets: list[dm.DeviceBudget] | None, context: int,
                    kv_cache: str = "auto") -> tuple[dm.DevicePlan, torch.dtype]:
    """The device plan (core/placement/device_map.py) and the weights' dtype, from the config alone."""
    if device_map != "auto":
        raise InputError(f"unknown device map '{device_map}'", hint="use --device-map auto")
    budgets = budgets or dm.device_budgets()
    target = resolve_dtype(dtype, config, kind=kind, device=torch.device(budgets[0].name))
    return dm.plan(config, target, budgets, context, kv_cache=kv_cache), target


def read_tokenizer(checkpoint: Checkpoint, wanted: bool = True):
    """The checkpoint's tokenizer (None unless wanted), read before the weights: a GGUF's metadata (the
    vocabulary as Python lists) is then released before the weights arrive instead of adding to the peak,
    and a broken tokenizer fails fast."""
    tokenizer = checkpoint.tokenizer() if wanted else None
    checkpoint.release_metadata()
    return tokenizer


def build_planned_model(plan: LoadPlan) -> nn.Module:
    """The planned model on the meta device; a tensor-parallel rank's with its row-parallel layers swapped in."""
    model = build_model(plan.config, plan.head)
    if plan.shard is not None:
        plan.shard.prepare(model)
    return model


def assign_checkpoint(model: nn.Module, checkpoint: Checkpoint, plan: LoadPlan) -> str | None:
    """The one place a checkpoint's tensors become the model's weights, one tensor in flight: a
    tensor-parallel rank reads its slices only, a quantized checkpoint's weight format takes its tensors
    out of the stream (and builds its layers at the end), the rest go through assign_weights. Returns the
    quantized scheme's label (None for float weights)."""
    if plan.device is not None and plan.device.type == "cpu":
        from llm_torch.core.model.layers import use_native_kernels

        use_native_kernels()  # before the weights are placed: it decides their layout (layers.k_major_weights)
    # 16-bit and fp32 sources come as stored (assign_weights casts); GGUF blocks are decoded to the plan's dtype,
    # or kept as blocks (packed kinds: the other tensors then keep their stored float dtype).
    packed = None
    if plan.packed_kinds:
        packed = GGUFPacked(model, checkpoint, plan.packed_kinds, plan.device)
        tensors = packed.filter(checkpoint.read_packed(plan.dtype, plan.packed_kinds))
    else:
        tensors = checkpoint.read(plan.dtype if plan.kind != "folder" else None,
                                  None if plan.shard is None else plan.shard.select)
    if plan.head == "feature_extraction":
        tensors = base_model_tensors(tensors)
    weight_format = None
    if plan.weight_format is not None:
        weight_format = plan.weight_format(model, checkpoint.quantization_config,
                                           lambda: {t.name for t in checkpoint.tensors}, plan.dtype, plan.device)
        tensors = weight_format.filter(tensors)
    assign_weights(model, tensors, None if packed else plan.dtype,
                   plan.device if plan.placement is None else plan.device_of, fast_layout=True)
    if packed is not None:
        packed.finish()
        return packed.label
    if weight_format is None:
        return None
    weight_format.finish()
    return weight_format.label  # the scheme its layers run in (int4-g64-g128, ...)


def install_runner(model: nn.Module, plan: LoadPlan) -> None:
    """What runs the loaded model, where the plan asks for more than the engine's default (runner.make_runner):
    a device map's hooks and per-layer KV placement. A tensor-parallel rank's runner needs the process group
    (cli/common.py installs it once every rank has loaded)."""
    if plan.placement is not None:
        dm.install(model, plan.placement)
