"""Models bigger than one device: decoder layers spread over the GPUs, then the CPU (`--device-map auto`),
pipeline style: each layer runs where its weights and its KV cache live, and the activations move on.

The plan comes from the config alone, before anything is loaded: per layer, its weights plus the KV cache
for the requested context; devices are filled in order (GPU 0, 1, ..., then the CPU), each up to its free
memory minus a reserve for activations. The embedding goes first; the final norm and an untied LM head
go after the last layer (a tied head stays with the embedding it shares). A model that fits nowhere is
refused with the numbers. Placement is installed from outside the model (forward pre-hooks that move a
module's inputs to its device), so core/model/model.py stays the plain definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_torch.core.model.config import ModelConfig, resolve_context
from llm_torch.core.errors import ResourceError

from .sizing import kv_layer_bytes, param_counts, weight_bytes

RESERVE = 0.1  # of each device's free memory, kept for activations and allocator slack
GIB = 2**30


@dataclass(frozen=True)
class DeviceBudget:
    name: str  # "cuda:0", "cpu", ...
    free_bytes: int


@dataclass
class DevicePlan:
    embed: str
    layers: list[str]
    head: str
    context: int
    weights: dict[str, int] = field(default_factory=dict)  # bytes of weights per device
    kv: dict[str, int] = field(default_factory=dict)  # bytes of KV cache per device (one sequence)
    free: dict[str, int] = field(default_factory=dict)

    def device_of(self, name: str) -> str:
        """The device of a checkpoint / parameter name."""
        if name.startswith("model.layers."):
            return self.layers[int(name.split(".")[2])]
        if name.startswith("model.embed_tokens"):
            return self.embed
        return self.head  # model.norm, lm_head

    def lines(self) -> list[str]:
        out = []
        for dev in dict.fromkeys([self.embed, *self.layers, self.head]):
            idx = [i for i, d in enumerate(self.layers) if d == dev]
            what = [f"layers {idx[0]}-{idx[-1]}" if len(idx) > 1 else f"layer {idx[0]}"] if idx else []
            what += ["embedding"] if self.embed == dev else []
            what += ["norm + head"] if self.head == dev else []
            out.append(f"{dev}: {', '.join(what)}: {self.weights.get(dev, 0) / GIB:.2f} GiB weights + "
                       f"{self.kv.get(dev, 0) / GIB:.2f} GiB KV for {self.context} tokens, "
                       f"{self.free.get(dev, 0) / GIB:.2f} GiB free")
        return out


def device_budgets() -> list[DeviceBudget]:
    """This machine's GPUs in order, then the CPU, with their free memory."""
    from .memory import available_bytes

    out = []
    if torch.cuda.is_available():
        out += [DeviceBudget(f"cuda:{i}", torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())]
    cpu = available_bytes(torch.device("cpu"))
    out.append(DeviceBudget("cpu", cpu if cpu is not None else 0))
    return out


def plan(config: ModelConfig, dtype: torch.dtype, budgets: list[DeviceBudget], context: int | None = None,
         slots: int = 1, kv_cache: str = "auto") -> DevicePlan:
    """Where each part goes (module doc); ResourceError when the model does not fit on all of them."""
    context = resolve_context(config, context)
    counts = param_counts(config)
    embed_bytes, head_bytes = weight_bytes(counts.embed, dtype), weight_bytes(counts.head, dtype)
    layer_bytes = [weight_bytes(n, dtype) for n in counts.layers]
    kv_by_device: dict[str, list[int]] = {}  # the KV dtype depends on the device (fp32 activations on a CPU)

    def kv_bytes(layer: int, device: str) -> int:
        if device not in kv_by_device:
            kv_by_device[device] = kv_layer_bytes(config, context, dtype, device.split(":")[0], slots, kv_cache)
        return kv_by_device[device][layer]

    usable = [int(b.free_bytes * (1 - RESERVE)) for b in budgets]
    used = [0] * len(budgets)
    result = DevicePlan(embed="", layers=[], head="", context=context,
                        free={b.name: b.free_bytes for b in budgets})
    d = 0

    def place(cost_of, what: str) -> str:
        nonlocal d
        while d < len(budgets) and used[d] + cost_of(budgets[d].name) > usable[d]:
            d += 1
        if d == len(budgets):
            need = embed_bytes + head_bytes + sum(n + kv_bytes(i, "cuda") for i, n in enumerate(layer_bytes))
            have = sum(b.free_bytes for b in budgets)
            raise ResourceError(
                f"the model does not fit: {what} finds no room; it needs ~{need / GIB:.1f} GiB (weights + KV for "
                f"{context} tokens) and the devices have {have / GIB:.1f} GiB free "
                f"({', '.join(f'{b.name} {b.free_bytes / GIB:.1f}' for b in budgets)})",
                hint="use a quantized model, --dtype bfloat16, or a shorter --context")
        name = budgets[d].name
        used[d] += cost_of(name)
        return name

    result.embed = place(lambda _: embed_bytes, "the embedding")
    result.weights[result.embed] = embed_bytes
    for i, n in enumerate(layer_bytes):
        dev = place(lambda name, i=i, n=n: n + kv_bytes(i, name), f"layer {i}")
        result.layers.append(dev)
        result.weights[dev] = result.weights.get(dev, 0) + n
        result.kv[dev] = result.kv.get(dev, 0) + kv_bytes(i, dev)
    # A tied head is the embedding's table: it and the final norm stay beside it.
    result.head = result.embed if config.tie_word_embeddings else place(lambda _: head_bytes, "the LM head")
    result.weights[result.head] = result.weights.get(result.head, 0) + head_bytes
    return result


def _to_device_of(module: nn.Module):
    device = next(module.parameters()).device

    def hook(_module, args):
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    return hook


def install(model: nn.Module, device_plan: DevicePlan) -> None:
    """Hooks that move each placed module's inputs to its device, and an engine runner whose KV cache puts
    each layer's keys and values beside it."""
    from llm_torch.core.engine.runner import TorchRunner, install as install_runner

    decoder = model.model
    for layer in decoder.layers:
        layer.register_forward_pre_hook(_to_device_of(layer))
    decoder.embed_tokens.register_forward_pre_hook(_to_device_of(decoder.embed_tokens))
    decoder.norm.register_forward_pre_hook(_to_device_of(decoder.norm))
    model.lm_head.register_forward_pre_hook(_to_device_of(model.lm_head))
    decoder.rotary_emb.to(device_plan.head)  # rope tables are made where positions live (the head's device)
    devices = [torch.device(d) for d in device_plan.layers]
    install_runner(model, lambda m: TorchRunner(m, "device map: layers over " + ", ".join(dict.fromkeys(device_plan.layers)),
                                                layer_devices=devices))
