"""Running one model over N processes (tensor parallel, core/placement/tensor_parallel.py) with torch.distributed.

Launch: `torchrun --nproc-per-node N $(which llm) generate ... ` (torchrun sets RANK, WORLD_SIZE,
MASTER_ADDR/PORT), or `llm generate --tp N ...`, which starts ranks 1..N-1 itself as copies of the same
command with those variables set. Rank 0 does everything a single process does (reads the input, runs the
engine's scheduler and sampling, prints); every step it broadcasts the plan (the segments to run, the KV
slots' lengths, prefix copies) as one int64 tensor, and all ranks run the forward together (the layers'
all-reduces keep them in step). Ranks > 0 only load their shard and follow the plans until rank 0 says stop.
Backend: gloo on CPU, NCCL on CUDA. Plans are plain integer tensors: nothing is pickled between ranks.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch

from llm_torch.core.errors import InputError, ResourceError
from llm_torch.core.engine.runner import Runner, Segment

STOP, FORWARD = 0, 1
# An idle server's workers wait in a broadcast for the next request: collectives must not time out.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    spawned: list = field(default_factory=list)  # (Popen, stderr file) of ranks this process started


def launched_rank() -> int | None:
    """This process's rank when started by torchrun or by `--tp` (None: a plain single process)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return None
    return int(os.environ.get("RANK", "0"))


def init(tp: int | None, device: torch.device, argv: Sequence[str] | None = None) -> Context | None:
    """Join (or, with tp > 1 and no launcher, create) the process group; None when running alone.

    argv: the command to start ranks 1..tp-1 with (default: this process's own command line)."""
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        if tp not in (None, env_world):
            raise InputError(f"--tp {tp} but the launcher started {env_world} processes", hint="make them match")
        world, rank = env_world, int(os.environ.get("RANK", "0"))
    elif tp is None or tp <= 1:
        return None
    else:
        world, rank = tp, 0
    spawned = []
    if env_world <= 1:
        spawned = _spawn(world, list(argv if argv is not None else sys.argv))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if torch.cuda.device_count() < world:
            raise ResourceError(f"--tp {world} on CUDA needs {world} GPUs, this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    ctx = Context(rank, world, device, spawned)
    if rank == 0:
        atexit.register(_shutdown, ctx)
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, argv: list[str]) -> list:
    """Start ranks 1..world-1 as copies of this command (the CLI's entry point), quiet and without stdin."""
    port = str(_free_port())
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    command = [sys.executable, "-c", "from llm_torch.cli.app import main; main()", *argv[1:]]
    out = []
    for rank in range(1, world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        out.append((proc, log))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world))
    return out


def _shutdown(ctx: Context) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            _broadcast_plan(torch.tensor([STOP], dtype=torch.int64), ctx.device)
        except RuntimeError:
            pass  # a rank already gone: nothing left to stop
        dist.destroy_process_group()
    for proc, log in ctx.spawned:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def worker_failure(ctx: Context) -> str | None:
    """The last stderr line of a spawned rank that exited with an error, for rank 0's message."""
    for proc, log in ctx.spawned:
        if proc.poll() not in (None, 0):
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else f"rank exited with {proc.returncode}"
    return None


# ---- plans ------------------------------------------------------------------------------------------------


def _broadcast_plan(plan: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    size = torch.tensor([0 if plan is None else plan.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    if plan is None:
        plan = torch.empty(int(size.item()), dtype=torch.int64, device=device)
    else:
        plan = plan.to(device)
    dist.broadcast(plan, 0)
    return plan.cpu()


def encode(cache_id: int, cache, segments: Sequence[Segment], copies: list) -> torch.Tensor:
    """[FORWARD, cache id, slots, max_len, ring margin (-1: none), capacity, #segments, #copies,
    lengths..., copies (src, dst, length, src length)..., segments (slot, logits, rope_len (-1: None), n,
    tokens...)...]"""
    out = [FORWARD, cache_id, cache.n_slots, cache.max_len, -1 if cache.ring_margin is None else cache.ring_margin,
           cache.capacity, len(segments), len(copies), *cache.lengths]
    for c in copies:
        out += list(c)
    for s in segments:
        out += [s.slot, int(s.logits), -1 if s.rope_len is None else s.rope_len, len(s.tokens), *s.tokens]
    return torch.tensor(out, dtype=torch.int64)


class TPRunner(Runner):
    """Rank 0's runner: broadcasts each step's plan, then runs its own shard with the others."""

    def __init__(self, inner: Runner, ctx: Context):
        self.inner = inner
        self.ctx = ctx
        self.model, self.config, self.device, self.dtype = inner.model, inner.config, inner.device, inner.dtype
        self.description = f"tensor parallel over {ctx.world} ranks ({inner.description})"
        self._caches = 0

    def new_cache(self, n_slots, max_len, **kw):
        cache = self.inner.new_cache(n_slots, max_len, **kw)
        self._caches += 1
        cache.tp_id = self._caches  # the workers mirror the newest cache only
        cache.journal = []
        return cache

    def forward(self, cache, segments):
        cache.ensure(max(cache.lengths[s.slot] + len(s.tokens) for s in segments))
        copies, cache.journal = cache.journal, []
        _broadcast_plan(encode(cache.tp_id, cache, segments, copies), self.ctx.device)
        return self.inner.forward(cache, segments)


def follow(runner: Runner, ctx: Context) -> None:
    """A worker rank's loop: mirror rank 0's cache operations and run each step's forward, until STOP."""
    cache, cache_id = None, None
    with torch.inference_mode():
        while True:
            plan = _broadcast_plan(None, ctx.device).tolist()
            if plan[0] == STOP:
                return
            _, cid, n_slots, max_len, margin, capacity, n_seg, n_copies = plan[:8]
            if cid != cache_id:
                cache, cache_id = runner.new_cache(n_slots, max_len, ring_margin=None if margin < 0 else margin,
                                                   initial_len=capacity), cid
            cache.grow_to(capacity)
            at = 8 + n_slots
            lengths = plan[8:at]
            for _ in range(n_copies):
                src, dst, length, src_len = plan[at : at + 4]
                cache.lengths[src] = src_len
                cache.copy_prefix(src, dst, length)
                at += 4
            cache.lengths[:] = lengths
            segments = []
            for _ in range(n_seg):
                slot, logits, rope_len, n = plan[at : at + 4]
                segments.append(Segment(slot, plan[at + 4 : at + 4 + n], bool(logits), None if rope_len < 0 else rope_len))
                at += 4 + n
            runner.forward(cache, segments)
