"""Speed measurements behind `llm bench` and benchmarks/compare.py. No printing: results are dataclasses.

What is measured, and how:
- load: wall time of `load_model` in this process (resolve, config, weights, tokenizer);
- prefill at N tokens: the engine (core/engine.py) with a fixed random prompt of N ids and max_new_tokens=1, i.e.
  the time to the first token (forward over the prompt + last-position logits + sampling);
- decode: a 1-token prompt, then `new_tokens` steps through the KV cache (EOS never stops it);
- batched decode at batch B (`batches`): B sequences with different short prompts in one engine, then
  `new_tokens` steps that decode all of them at once; aggregate tokens/s = B x new_tokens / the time of
  those steps, per-sequence tokens/s = new_tokens / that time;
- each measurement runs `warmup` times uncounted, then `repetitions` times, interleaved per repetition
  (pp128, pp512, tg, pp128, ...) so slow drift on a shared machine hits every test alike;
- memory bandwidth: a read-only reduction over a buffer far larger than the last-level cache, with the
  threads the model uses; decode's ceiling is that bandwidth / the weight bytes one token reads.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import kernels
from .errors import InputError
from .engine import Engine, EngineConfig
from .generate import GenerationSpec, Timings, context_length
from .runner import Runner, make_runner
from .sampling import SamplingSpec

DEFAULT_PROMPT_LENGTHS = (128, 512)
DEFAULT_NEW_TOKENS = 128
DEFAULT_REPETITIONS = 3
DECODE_PROMPT_TOKENS = 1  # like llama-bench's tg test: decode from an (almost) empty context
BATCH_PROMPT_TOKENS = 16  # each sequence of a batched decode test has its own prompt of this length
BANDWIDTH_BUFFER_MIB = 256  # 8x this machine's 32 MiB L3: the reads must come from DRAM


@dataclass(frozen=True)
class BenchSpec:
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    new_tokens: int = DEFAULT_NEW_TOKENS
    repetitions: int = DEFAULT_REPETITIONS
    warmup: int = 1
    seed: int = 0  # for the random prompt ids: the same prompt every run and every engine
    batches: tuple[int, ...] = ()  # batched decode tests: sequences decoding at once

    def __post_init__(self):
        if any(b < 1 for b in self.batches):
            raise InputError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.batches and self.new_tokens < 1:
            raise InputError("batched decode tests need --new-tokens >= 1")
        if self.repetitions < 1:
            raise InputError(f"repetitions must be >= 1, got {self.repetitions}")
        if self.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {self.warmup}")
        if self.new_tokens < 0:
            raise InputError(f"new tokens must be >= 0, got {self.new_tokens}")
        if any(n < 1 for n in self.prompt_lengths):
            raise InputError(f"prompt lengths must be >= 1, got {list(self.prompt_lengths)}")
        if not self.prompt_lengths and self.new_tokens == 0:
            raise InputError("nothing to measure: no prompt lengths and no new tokens")


@dataclass(frozen=True)
class Stat:
    """Median, min and max of repeated runs (the runs themselves kept for the JSON output)."""

    median: float
    min: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    def to_dict(self, digits: int = 3) -> dict[str, Any]:
        return {
            "median": round(self.median, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
            "runs": [round(v, digits) for v in self.runs],
        }


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dtype: str
    device: str
    params: int  # unique parameters (a tied head counted once)
    weights_bytes: int  # bytes of those parameters (and persistent buffers) in memory
    bytes_per_token: int  # weight bytes one decode step reads (see weight_bytes_per_token)


@dataclass(frozen=True)
class Bandwidth:
    read_gb_per_s: float  # best of the timed reductions: the ceiling the hardware allows
    read_median_gb_per_s: float
    copy_gb_per_s: float  # read + write bytes of a copy, for reference
    buffer_bytes: int
    threads: int
    method: str = "torch.sum over a float32 buffer (read); Tensor.copy_ (read + write)"


@dataclass(frozen=True)
class PrefillResult:
    prompt_tokens: int
    tokens_per_second: Stat
    seconds: Stat


@dataclass(frozen=True)
class DecodeResult:
    prompt_tokens: int
    new_tokens: int
    tokens_per_second: Stat
    seconds: Stat


@dataclass(frozen=True)
class BatchResult:
    batch: int
    prompt_tokens: int  # per sequence
    new_tokens: int  # per sequence
    tokens_per_second: Stat  # aggregate: all sequences together
    per_sequence_tokens_per_second: Stat
    seconds: Stat


@dataclass
class BenchResult:
    model: ModelInfo
    spec: BenchSpec
    threads: int
    load_seconds: float
    startup_seconds: float | None  # process start -> just before load_model (interpreter + imports)
    first_token_seconds: float | None  # the very first (cold, uncounted) prefill after load
    first_token_prompt_tokens: int | None
    prefill: list[PrefillResult] = field(default_factory=list)
    decode: DecodeResult | None = None
    batched: list[BatchResult] = field(default_factory=list)
    peak_rss_bytes: int = 0  # after load and every run, before the bandwidth probe allocates its buffer
    bandwidth: Bandwidth | None = None
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def decode_ceiling_tokens_per_second(self) -> float | None:
        if self.bandwidth is None or self.model.bytes_per_token <= 0:
            return None
        return self.bandwidth.read_gb_per_s * 1e9 / self.model.bytes_per_token

    @property
    def decode_fraction_of_ceiling(self) -> float | None:
        ceiling = self.decode_ceiling_tokens_per_second
        if ceiling is None or self.decode is None:
            return None
        return self.decode.tokens_per_second.median / ceiling

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `llm bench --format json`; keys are stable, figures rounded."""
        ceiling = self.decode_ceiling_tokens_per_second
        fraction = self.decode_fraction_of_ceiling
        return {
            "model": asdict(self.model),
            "threads": self.threads,
            "repetitions": self.spec.repetitions,
            "warmup": self.spec.warmup,
            "load": {
                "seconds": round(self.load_seconds, 4),
                "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 3),
                "first_token_seconds": None if self.first_token_seconds is None else round(self.first_token_seconds, 4),
                "first_token_prompt_tokens": self.first_token_prompt_tokens,
            },
            "prefill": [
                {
                    "prompt_tokens": p.prompt_tokens,
                    "tokens_per_second": p.tokens_per_second.to_dict(),
                    "seconds": p.seconds.to_dict(5),
                }
                for p in self.prefill
            ],
            "decode": None
            if self.decode is None
            else {
                "prompt_tokens": self.decode.prompt_tokens,
                "new_tokens": self.decode.new_tokens,
                "tokens_per_second": self.decode.tokens_per_second.to_dict(),
                "seconds": self.decode.seconds.to_dict(5),
            },
            "batched_decode": [
                {
                    "batch": b.batch,
                    "prompt_tokens": b.prompt_tokens,
                    "new_tokens": b.new_tokens,
                    "tokens_per_second": b.tokens_per_second.to_dict(),
                    "per_sequence_tokens_per_second": b.per_sequence_tokens_per_second.to_dict(),
                    "seconds": b.seconds.to_dict(5),
                }
                for b in self.batched
            ],
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "memory_bandwidth": None
            if self.bandwidth is None
            else {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self.bandwidth).items()},
            "decode_ceiling_tokens_per_second": None if ceiling is None else round(ceiling, 2),
            "decode_fraction_of_ceiling": None if fraction is None else round(fraction, 4),
            "environment": dict(self.environment),
        }


# ---------------------------------------------------------------------------------------- model facts


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers (quantized weights may live in buffers), each storage once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    non_persistent = {
        id(b)
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None and name in m._non_persistent_buffers_set
    }
    for t in list(model.parameters()) + [b for b in model.buffers() if id(b) not in non_persistent]:
        key = t.data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_parameters(model))


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every weight once, except that an embedding table read only
    by its lookup costs one row. A head tied to the embedding reads the whole table (as the head).
    The KV cache is not counted: at benchmark lengths it is small next to the weights."""
    total = weights_bytes(model)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    readers = {  # storages read in full by some other module (a tied lm_head is an nn.Linear)
        m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)
    }
    for emb in embeddings:
        w = emb.weight
        if w.data_ptr() in readers:
            continue
        row = w.shape[1] * w.element_size()
        total -= w.numel() * w.element_size() - row
    return total


def logical_params(model) -> int:
    """Parameters as the float model counts them: quantized layers (an int `qweight` buffer, quant's
    torchao-scheme modules) count their out x in weights, not their packed bytes; tied tensors once."""
    seen, total = set(), 0
    for m in model.modules():
        q = m._buffers.get("qweight")
        if q is not None:
            if q.data_ptr() not in seen:
                seen.add(q.data_ptr())
                rows = getattr(m, "out_features", None) or m.num_embeddings
                cols = getattr(m, "in_features", None) or m.embedding_dim
                total += rows * cols
            continue
        for p in m.parameters(recurse=False):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def model_info(loaded) -> ModelInfo:
    model = loaded.model
    params = logical_params(model)
    device = next(model.parameters()).device
    return ModelInfo(
        name=loaded.name,
        dtype=loaded.dtype_name,
        device=str(device),
        params=params,
        weights_bytes=weights_bytes(model),
        bytes_per_token=weight_bytes_per_token(model),
    )


# ---------------------------------------------------------------------------------------- process facts


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM from /proc, not ru_maxrss, because a process started with vfork/posix_spawn (Python's
    subprocess does) inherits its parent's ru_maxrss at exec: a bench run from a 1 GB Python process
    would report at least 1 GB. VmHWM belongs to this process's own address space.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass  # not Linux (or no procfs): ru_maxrss below
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms resolution); None elsewhere.

    Read just before loading, it is the interpreter + import time a user pays before the model loads.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22 (starttime, in clock ticks since boot); the command name before it may hold spaces.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def environment() -> dict[str, str]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {
        "load_average": load,  # 1/5/15 min, at the start: above the thread count, the figures are noisy
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "machine": platform.machine(),
        "cpus_available": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "decode_kernels": kernels.status().detail,
    }


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: keep torch's choice); -> the count in effect."""
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------- measurements


def measure_memory_bandwidth(buffer_mib: int = BANDWIDTH_BUFFER_MIB, repeats: int = 15) -> Bandwidth:
    """DRAM read bandwidth with the current torch threads: the best of `repeats` timed sums.

    The best, not the median, because it estimates what the hardware allows; other load on the
    machine only lowers it. The buffer is freed before returning.
    """
    n = buffer_mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)  # ones, not empty: pages must be touched before timing
    dst = torch.empty_like(src)
    dst.copy_(src)
    src.sum()  # warm-up: thread pool start, code paths
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        reads.append(src.nbytes / (time.perf_counter() - t0) / 1e9)
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    nbytes = src.nbytes
    del src, dst
    return Bandwidth(max(reads), statistics.median(reads), max(copies), nbytes, torch.get_num_threads())


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """Fixed pseudo-random ids (not the chat template): the same prompt for every run and engine.

    Ids 0..2 are avoided because they are BOS/EOS/PAD in most vocabularies; speed does not depend on them.
    """
    g = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (length,), generator=g).tolist()


def _run(runner: Runner, prompt_ids: Sequence[int], max_new_tokens: int) -> Timings:
    # No EOS ids: a benchmark must always run the full count.
    spec = GenerationSpec(max_new_tokens=max_new_tokens, sampling=SamplingSpec(), eos_token_ids=())
    engine = Engine(runner.model, None, EngineConfig(max_batch=1), runner=runner)
    for event in engine.stream(prompt_ids, spec):
        if event.finish_reason:
            return event.timings
    raise AssertionError("stream ended without a final event")


def time_prefill(runner: Runner, prompt_ids: Sequence[int]) -> Timings:
    """Time to the first token for this prompt (prefill + first sample)."""
    return _run(runner, prompt_ids, 1)


def time_decode(runner: Runner, prompt_ids: Sequence[int], new_tokens: int) -> Timings:
    """`new_tokens` decode steps after the prompt (one more token comes out of prefill, uncounted)."""
    timings = _run(runner, prompt_ids, new_tokens + 1)
    if timings.completion_tokens != new_tokens + 1:
        raise InputError(
            f"decode stopped after {timings.completion_tokens - 1} of {new_tokens} tokens (context too short)",
            hint="lower --new-tokens",
        )
    return timings


def time_batched_decode(runner: Runner, prompts: Sequence[Sequence[int]], new_tokens: int) -> float:
    """Seconds of the `new_tokens` steps that decode every prompt's sequence at once (after all prefills)."""
    spec = GenerationSpec(max_new_tokens=new_tokens + 1, sampling=SamplingSpec(), eos_token_ids=())
    engine = Engine(runner.model, None, EngineConfig(max_batch=len(prompts)), runner=runner)
    reqs = [engine.add(p, spec) for p in prompts]
    while not all(r.generated for r in reqs):
        engine.step()
    if any(len(r.generated) != 1 for r in reqs):
        raise AssertionError("the prefills did not end on the same step")
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - t0
    if any(len(r.generated) != new_tokens + 1 for r in reqs):
        raise InputError("batched decode stopped early (context too short)", hint="lower --new-tokens")
    return seconds


def check_fits(model, spec: BenchSpec) -> None:
    context = context_length(model)
    too_long = [n for n in spec.prompt_lengths if n + 1 > context]
    if too_long:
        raise InputError(
            f"prompt length {max(too_long)} does not fit the model's context of {context} tokens",
            hint=f"use --prompt-lengths below {context}",
        )
    if (BATCH_PROMPT_TOKENS if spec.batches else DECODE_PROMPT_TOKENS) + spec.new_tokens + 1 > context:
        raise InputError(
            f"{spec.new_tokens} new tokens do not fit the model's context of {context} tokens",
            hint=f"use --new-tokens below {context - DECODE_PROMPT_TOKENS - 1}",
        )


Progress = Callable[[str], None]


def bench_loaded(loaded, spec: BenchSpec, *, progress: Progress | None = None
                 ) -> tuple[list[PrefillResult], DecodeResult | None, float | None, list[BatchResult]]:
    """Warm-up then interleaved repetitions on an already loaded model.

    -> (prefill results, decode result, seconds of the first, cold prefill, batched decode results).
    """
    say = progress or (lambda _msg: None)
    model = loaded.model
    check_fits(model, spec)
    runner = make_runner(model)
    vocab = model.config.vocab_size
    prompts = {n: random_prompt(vocab, n, spec.seed) for n in spec.prompt_lengths}
    decode_prompt = random_prompt(vocab, DECODE_PROMPT_TOKENS, spec.seed + 1)
    prefill_runs: dict[int, list[Timings]] = {n: [] for n in spec.prompt_lengths}
    decode_runs: list[Timings] = []
    batch_prompts = {b: [random_prompt(vocab, BATCH_PROMPT_TOKENS, spec.seed + 2 + i) for i in range(b)]
                     for b in spec.batches}
    batch_runs: dict[int, list[float]] = {b: [] for b in spec.batches}
    first_token = None
    for rep in range(-spec.warmup, spec.repetitions):
        label = "warm-up" if rep < 0 else f"run {rep + 1}/{spec.repetitions}"
        for n, ids in prompts.items():
            say(f"{label}: prefill {n} tokens")
            t = time_prefill(runner, ids)
            if first_token is None:
                first_token = t.prefill_seconds
            if rep >= 0:
                prefill_runs[n].append(t)
        if spec.new_tokens:
            say(f"{label}: decode {spec.new_tokens} tokens")
            t = time_decode(runner, decode_prompt, spec.new_tokens)
            if first_token is None:
                first_token = t.prefill_seconds
            if rep >= 0:
                decode_runs.append(t)
        for b, ps in batch_prompts.items():
            say(f"{label}: decode {spec.new_tokens} tokens x batch {b}")
            seconds = time_batched_decode(runner, ps, spec.new_tokens)
            if rep >= 0:
                batch_runs[b].append(seconds)
    batched = [
        BatchResult(b, BATCH_PROMPT_TOKENS, spec.new_tokens,
                    Stat.of([b * spec.new_tokens / s for s in runs]), Stat.of([spec.new_tokens / s for s in runs]),
                    Stat.of(runs))
        for b, runs in batch_runs.items()
    ]
    prefill = [
        PrefillResult(
            n,
            Stat.of([t.prefill_tokens_per_second for t in runs]),
            Stat.of([t.prefill_seconds for t in runs]),
        )
        for n, runs in prefill_runs.items()
    ]
    decode = None
    if decode_runs:
        decode = DecodeResult(
            DECODE_PROMPT_TOKENS,
            spec.new_tokens,
            Stat.of([t.decode_tokens_per_second for t in decode_runs]),
            Stat.of([t.decode_seconds for t in decode_runs]),
        )
    return prefill, decode, first_token, batched


def run_bench(
    ref: str | None,
    spec: BenchSpec = BenchSpec(),
    *,
    dtype: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    bandwidth: bool = True,
    progress: Progress | None = None,
    prepare: Callable[[Any], Any] | None = None,
) -> BenchResult:
    """Load `ref`, measure load, prefill and decode, then peak RSS and the memory bandwidth.

    prepare(loaded): run after loading and timed with it (the CLI's --quantize)."""
    from .loading import load_model

    say = progress or (lambda _msg: None)
    used_threads = set_threads(threads)
    startup = process_age_seconds()
    env = environment()  # before the runs: the load average is the machine's, not ours
    say("loading")
    t0 = time.perf_counter()
    loaded = load_model(ref, dtype=dtype, device=device, progress=False)
    if prepare is not None:
        prepare(loaded)
    load_seconds = time.perf_counter() - t0
    info = model_info(loaded)
    if info.device == "cpu":
        from .runner import describe

        env["decode_step"] = describe(loaded.model)
    prefill, decode, first_token, batched = bench_loaded(loaded, spec, progress=progress)
    peak = peak_rss_bytes()  # before the bandwidth buffer exists, so it is the model's peak
    result = BenchResult(
        model=info,
        spec=spec,
        threads=used_threads,
        load_seconds=load_seconds,
        startup_seconds=startup,
        first_token_seconds=first_token,
        first_token_prompt_tokens=spec.prompt_lengths[0] if spec.prompt_lengths else (DECODE_PROMPT_TOKENS if spec.new_tokens else None),
        prefill=prefill,
        decode=decode,
        batched=batched,
        peak_rss_bytes=peak,
        environment=env,
    )
    if bandwidth and info.device == "cpu":
        say("measuring memory bandwidth")
        result.bandwidth = measure_memory_bandwidth()
    return result
