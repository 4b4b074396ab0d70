"""Tensor parallelism: one model split over N ranks of a torch.distributed process group (gloo on CPU,
NCCL on GPUs), installed on the model from outside as gpt-fast's tp.py does.

Per decoder layer: q/k/v are split by heads (column-parallel: rank r computes heads [r H/N, (r+1) H/N) and
their keys/values, so each rank's KV cache holds H_kv/N heads), o_proj by its input columns (row-parallel:
partial sums, one all-reduce); gate/up by rows, down_proj by columns (one more all-reduce). Two
all-reduces per block. Embeddings, norms and the LM head are replicated: every rank ends with the same
logits (only rank 0 samples). Each rank reads only its slices of the split tensors from safetensors
(memory per rank ~ split weights / N + the replicated ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_torch.core.model.config import ModelConfig
from llm_torch.core.errors import InputError
from llm_torch.core.model.layers import Attention, Linear, MLP

# checkpoint tensor name suffix -> the dim split over the ranks (the others are replicated)
SPLIT = {
    "self_attn.q_proj.weight": 0, "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0, "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0, "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0, "mlp.gate_proj.bias": 0,
    "mlp.up_proj.weight": 0, "mlp.up_proj.bias": 0,
    "mlp.down_proj.weight": 1,
}


def check_splits(config: ModelConfig, world: int) -> None:
    """A clear error when the heads or the MLP do not split evenly over `world` ranks."""
    H, H_kv, I = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if world < 1:
        raise InputError(f"--tp must be >= 1, got {world}")
    if H % world or H_kv % world or I % world:
        raise InputError(
            f"--tp {world}: {H} attention heads, {H_kv} key/value heads and an MLP of {I} do not all split "
            f"evenly over {world} ranks",
            hint=f"use a --tp that divides {H_kv} (the key/value heads)",
        )


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    group: object = None  # the torch.distributed process group (None: the default one)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config one rank builds: its share of the heads and of the MLP; head_dim stays."""
        check_splits(config, self.world)
        return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // self.world,
                                   num_key_value_heads=config.num_key_value_heads // self.world,
                                   intermediate_size=config.intermediate_size // self.world)

    def select(self, name: str, shape) -> tuple[slice, ...] | None:
        """The index of this rank's part of checkpoint tensor `name` (None: the whole tensor)."""
        dim = next((d for suffix, d in SPLIT.items() if name.endswith(suffix)), None)
        if dim is None:
            return None
        size = shape[dim] // self.world
        index = [slice(None)] * len(shape)
        index[dim] = slice(self.rank * size, (self.rank + 1) * size)
        return tuple(index)

    def prepare(self, model: nn.Module) -> None:
        """Swap o_proj and down_proj (still on the meta device) for row-parallel layers."""
        for m in model.modules():
            if isinstance(m, Attention):
                m.o_proj = RowParallelLinear.like(m.o_proj, self.group)
            elif isinstance(m, MLP):
                m.down_proj = RowParallelLinear.like(m.down_proj, self.group)


class RowParallelLinear(Linear):
    """A Linear holding one rank's input columns: the partial products of all ranks are summed by one
    all-reduce, then the (replicated) bias is added once."""

    group = None

    @classmethod
    def like(cls, linear: Linear, group) -> RowParallelLinear:
        with torch.device(linear.weight.device):
            out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        out.group = group
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        w = self.weight
        y = F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)
