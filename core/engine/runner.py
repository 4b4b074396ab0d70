"""Executes the engine's forward steps: segments of tokens (one per sequence) over a KVCache -> logits.

A segment continues one sequence in one cache slot: a single token (decode) or a run of prompt tokens
(a prefill chunk). Two runners share one interface:
- NativeRunner: every segment of a step in one call to core.engine.native_step (all layers in C, each weight
  read once for all rows); CPU, fp32 activations, layers step.c knows.
- TorchRunner: the PyTorch layers of core/model/model.py (the reference; any device, dtype and layer):
  decode tokens batched in one forward, each prefill chunk in its own.
`make_runner(model)` picks one and says why in `runner.description`. A model that only one runner computes
correctly (a device map's hooks, a tensor parallel shard) or that was asked for one (--compile) carries
that choice as its `runner_factory`, set by `install` alone: Engine(model) then needs nothing else passed
through the CLI, the tasks and the server, and no table outlives the model. Speed is installed from here,
never written into core/model/model.py. Build the runner after the model is final (quantized, moved): the
native one points at the weights it was built over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from llm_torch.core import kernels
from llm_torch.core.model.kv_cache import KVCache
from llm_torch.core.model.layers import compute_dtype
from llm_torch.core.model.model import CausalLM

NATIVE = "all layers in one native call"


@dataclass(frozen=True)
class Segment:
    """tokens continue the sequence in cache slot `slot` at its current length; `logits`: whether the
    last token's logits are wanted (the last prompt chunk, every decode token); `rope_len`: the sequence
    length dynamic NTK rope scales these tokens' frequencies for (None: the position after the last token).
    The engine gives every chunk of a prompt the prompt's length: transformers rotates a whole prompt with
    one set, so the chunking does not change the keys."""

    slot: int
    tokens: Sequence[int]
    logits: bool = True
    rope_len: int | None = None


class Runner:
    description = ""
    layer_devices: list[torch.device] | None = None  # a device map's: each layer's KV cache beside its weights

    def __init__(self, model: CausalLM):
        if not isinstance(model, CausalLM):
            raise TypeError(f"generation needs a causal LM head, not {type(model).__name__}")
        self.model = model
        self.config = model.config
        p = model.lm_head.weight
        self.device = p.device
        self.dtype = compute_dtype(p.dtype, p.device)

    def new_cache(self, n_slots: int, max_len: int, **kw) -> KVCache:
        return self.model.new_cache(n_slots, max_len, layer_devices=self.layer_devices, **kw)

    def forward(self, cache: KVCache, segments: Sequence[Segment]) -> torch.Tensor:
        """Runs every segment (advancing its slot's length) -> fp32 logits [n, V] of the segments that want
        them, in order."""
        raise NotImplementedError


class TorchRunner(Runner):
    """decode: what runs the batch of one-token rows (default: the model; --compile's compiled forward, speed.py)."""

    def __init__(self, model: CausalLM, why: str, *, layer_devices: list[torch.device] | None = None,
                 decode: Callable[..., torch.Tensor] | None = None):
        super().__init__(model)
        self.description = f"PyTorch layers: {why}"
        self.layer_devices = layer_devices
        self.decode = decode if decode is not None else model

    def forward(self, cache, segments):
        out: list[torch.Tensor | None] = [None] * len(segments)
        single = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
        if single:
            ids = torch.tensor([[segments[i].tokens[0]] for i in single], device=self.device)
            # A one-token prefill remainder still rotates for its prompt's length (dynamic NTK), as NativeRunner does.
            lengths = [segments[i].rope_len if segments[i].rope_len is not None else cache.lengths[segments[i].slot] + 1
                       for i in single]
            logits = self.decode(ids, cache=cache, slots=[segments[i].slot for i in single], rope_lengths=lengths)[:, -1]
            for j, i in enumerate(single):
                out[i] = logits[j]
        for i, s in enumerate(segments):
            if len(s.tokens) > 1:
                ids = torch.tensor([list(s.tokens)], device=self.device)
                lengths = None if s.rope_len is None else [s.rope_len]
                out[i] = self.model(ids, cache=cache, slots=[s.slot], last_only=True, rope_lengths=lengths)[0, -1]
        wanted = [out[i] for i, s in enumerate(segments) if s.logits]
        if not wanted:
            return torch.empty(0, self.config.vocab_size)
        return torch.stack(wanted).float()


class NativeRunner(Runner):
    description = NATIVE

    def __init__(self, model: CausalLM, step):
        super().__init__(model)
        self.step = step
        self.decoder = model.model

    def forward(self, cache, segments):
        ids, slots, positions, out_rows = [], [], [], []
        for s in segments:
            start = cache.lengths[s.slot]
            ids.extend(s.tokens)
            slots.extend([s.slot] * len(s.tokens))
            positions.extend(range(start, start + len(s.tokens)))
            if s.logits:
                out_rows.append(len(ids) - 1)
        cache.ensure(max(p for p in positions) + 1)
        x = self.decoder.embed(torch.tensor([ids]))[0]  # [N, C]
        cos, sin = self._rope(segments, positions)
        logits = self.step(cache, x, cos, sin, slots, positions, out_rows)
        for s in segments:
            cache.lengths[s.slot] += len(s.tokens)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _rope(self, segments, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [N, D] of every row: step.c rotates with these tables, so they are the PyTorch path's
        own (RotaryEmbedding). Dynamic NTK rope depends on each sequence's length (Segment.rope_len), so it
        is computed per segment as the PyTorch path does; the others depend on the position alone."""
        rotary = self.decoder.rotary_emb
        if not rotary.dynamic:
            cos, sin = rotary(torch.tensor([positions]), torch.float32)
            return cos[0, :, 0], sin[0, :, 0]
        parts, at = [], 0
        for s in segments:
            n = len(s.tokens)
            lengths = None if s.rope_len is None else [s.rope_len]
            c, si = rotary(torch.tensor([positions[at : at + n]]), torch.float32, lengths)
            parts.append((c[0, :, 0], si[0, :, 0]))
            at += n
        return torch.cat([c for c, _ in parts]), torch.cat([si for _, si in parts])


RunnerFactory = Callable[[CausalLM], Runner]


def install(model: CausalLM, factory: RunnerFactory) -> None:
    """Make `factory(model)` the runner every engine over this model uses (a device map's, tensor parallel's,
    --compile's): kept on the model object itself, so it lives and dies with it."""
    model.runner_factory = factory


def make_runner(model: CausalLM) -> Runner:
    """The runner installed on this model, else the fastest that computes it here; its description says which
    and why."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"generation needs a causal LM head, not {type(model).__name__}")
    factory = getattr(model, "runner_factory", None)
    if factory is not None:
        return factory(model)
    why = native_problem(model)
    if why is not None:
        return TorchRunner(model, why)
    from .native_step import NativeStep, Unsupported

    try:
        return NativeRunner(model, NativeStep(kernels.matvec(), model))
    except Unsupported as e:
        return TorchRunner(model, f"not for {e}")


def native_problem(model: CausalLM) -> str | None:
    """Why the native step cannot run this model here, or None."""
    p = model.lm_head.weight
    if p.device.type != "cpu":
        return f"on {p.device.type}"
    if compute_dtype(p.dtype, p.device) != torch.float32:
        return f"{compute_dtype(p.dtype, p.device)} activations"
    mv = kernels.matvec()
    if mv is None:
        return kernels.status().detail
    if mv.forward_rows is None:
        return "the native step is off (LLM_KERNELS=matvec)"
    return None


def describe(model) -> str:
    """What would run generation for `model` (make_runner's description); other heads do not generate."""
    return make_runner(model).description if isinstance(model, CausalLM) else "no generation head"
