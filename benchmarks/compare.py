#!/usr/bin/env python
"""Our engine vs transformers vs llama.cpp on the embedded SmolLM2 GGUF, 2 threads, one process.

    python benchmarks/compare.py            # full run (about 5-10 minutes on 2 cores)
    python benchmarks/compare.py --quick    # one repetition, prefill 128 only, 32 new tokens, no RSS children

Optional dependencies, never installed by the project and never run in CI:
    pip install transformers          # transformers reads the GGUF through the gguf package we already need
    pip install llama-cpp-python      # compiles llama.cpp (about 10 minutes on 2 cores)
A missing package skips that engine with a message.

Method
- Every engine is loaded in this one process, then the runs are interleaved: a warm-up round, then per
  repetition each engine in turn (A, B, C, A, B, C, ...), so load on a shared machine drifts over all alike.
- Prefill N = time to the first token for the same N fixed random token ids (forward over the prompt,
  last-position logits, greedy pick). Decode = tokens/s over --new-tokens greedy steps after a 1-token
  prompt, timed from the first generated token to the last (EOS never stops a run). Medians, min-max.
- Batched decode (--batch B, default 8): B different 16-token prompts decoded together, aggregate
  tokens/s of the --new-tokens steps after the first token. Ours: B sequences in one engine (each weight
  read once per step for all of them). transformers: generate() on the B prompts as one batch (left
  padding, as a user batches them), decode time = generate(new_tokens + 1) - generate(1). llama.cpp:
  llama-cpp-python's API decodes one sequence at a time, so it has no batched figure.
- Load = wall time of the engine's load call in this process, after the GGUF is in the page cache.
  Import times are listed apart (torch is imported once and shared by ours and transformers).
- Peak RSS cannot be told apart per engine in one process, so each engine is also run in its own child
  process (load + one prefill at the longest length + one decode) and its ru_maxrss is reported; a child
  for llama.cpp does not import torch. The in-process RSS growth during load is shown too (`RSS +load`).
- The decode ceiling: this machine's read bandwidth (torch, same threads) / weight bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# transformers' GGUF dequantization draws a plain tqdm bar that its logging switches do not reach;
# tqdm reads this when imported, so it is set before anything imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")
# The CLI's OpenMP setting, for every engine in this process alike (before anything imports torch).
from llm_torch.core.openmp import tune_openmp  # noqa: E402

tune_openmp()

THREADS = 2
N_CTX = 1024
BASELINES = ("hf-float32", "llama.cpp")
ALL_ENGINES = ("ours-float32", "ours-bfloat16", "ours-auto", "hf-float32", "hf-bfloat16", "llama.cpp")


class Unavailable(Exception):
    """An engine that cannot run here (package missing, model unreadable by it)."""


def gguf_path() -> Path:
    from llm_torch.core.placement.loading import embedded_model_path

    return embedded_model_path("smollm2")


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    # Python's random, not torch: a llama.cpp child process must not import torch (it would inflate its RSS).
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak RSS of this process: VmHWM, not ru_maxrss. A child started by subprocess (vfork/posix_spawn)
    inherits the parent's ru_maxrss at exec, which would give every engine's child the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------------------------- engines


class Engine:
    key = ""
    label = ""
    note = ""  # what the engine resolved to (e.g. ours auto -> float32)

    def load(self, path: Path) -> None: ...

    def vocab_size(self) -> int: ...

    def prefill(self, ids: list[int]) -> float:
        """Seconds to the first token."""

    def decode(self, ids: list[int], new_tokens: int) -> float:
        """Tokens/s over `new_tokens` steps after the first generated token."""

    def bytes_per_token(self) -> int | None:
        return None

    def batch_decode(self, prompts: list[list[int]], new_tokens: int) -> float | None:
        """Aggregate tokens/s of `new_tokens` steps decoding every prompt's sequence at once (None: cannot)."""
        return None


def _import_torch() -> float:
    """Import torch with THREADS intra-op threads; -> seconds the import took (0 when already imported)."""
    t0 = time.perf_counter()
    already = "torch" in sys.modules
    import torch

    torch.set_num_threads(THREADS)
    return 0.0 if already else time.perf_counter() - t0


class Ours(Engine):
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.key = f"ours-{dtype}"
        self.label = f"llm-torch {dtype}"

    def imports(self) -> dict[str, float]:
        torch_s = _import_torch()
        t0 = time.perf_counter()
        import llm_torch.core.tools.bench  # noqa: F401  (the engine's whole import chain)
        import llm_torch.core.placement.loading  # noqa: F401

        return {"torch": torch_s, "llm_torch": time.perf_counter() - t0}

    def load(self, path):
        from llm_torch.core.placement.loading import load_model

        from llm_torch.core.engine.runner import make_runner

        self.loaded = load_model(str(path), dtype=self.dtype, progress=False)
        self.runner = make_runner(self.loaded.model)
        if self.dtype == "auto":
            self.note = f"auto -> {self.loaded.dtype_name}"
            self.label = f"llm-torch auto ({self.loaded.dtype_name})"

    def vocab_size(self):
        return self.loaded.config.vocab_size

    def prefill(self, ids):
        from llm_torch.core.tools.bench import time_prefill

        return time_prefill(self.runner, ids).prefill_seconds

    def decode(self, ids, new_tokens):
        from llm_torch.core.tools.bench import time_decode

        return time_decode(self.runner, ids, new_tokens).decode_tokens_per_second

    def bytes_per_token(self):
        from llm_torch.core.tools.model_size import weight_bytes_per_token

        return weight_bytes_per_token(self.loaded.model)

    def batch_decode(self, prompts, new_tokens):
        from llm_torch.core.tools.bench import time_batched_decode

        return len(prompts) * new_tokens / time_batched_decode(self.runner, prompts, new_tokens)


class _Stamps:
    """A transformers streamer that only records when each put() happens (prompt first, then each token)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Transformers(Engine):
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.key = f"hf-{dtype}"
        self.label = f"transformers {dtype}"

    def imports(self) -> dict[str, float]:
        torch_s = _import_torch()
        t0 = time.perf_counter()
        try:
            import transformers
        except ImportError as e:
            raise Unavailable(f"transformers is not installed ({e}); pip install transformers") from None
        transformers.logging.set_verbosity_error()  # generation-flag warnings would drown the table
        transformers.logging.disable_progress_bar()  # the GGUF dequantization bar too
        return {"torch": torch_s, "transformers": time.perf_counter() - t0}

    def load(self, path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()

    def vocab_size(self):
        return self.model.config.vocab_size

    def prefill(self, ids):
        torch = self.torch
        x = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            # A fresh DynamicCache is built, as generate() would; only the last position's logits.
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
            return time.perf_counter() - t0

    def decode(self, ids, new_tokens):
        torch = self.torch
        x = torch.tensor([ids])
        stamps = _Stamps()
        n = new_tokens + 1  # the first token comes out of prefill and is not a decode step
        with torch.inference_mode():
            self.model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,  # EOS cannot end the run early
                do_sample=False,
                pad_token_id=self.model.config.eos_token_id if self.model.config.pad_token_id is None else None,
                streamer=stamps,
            )
        # times[0]: the prompt; times[1]: the first generated token; times[-1]: the last one.
        steps = len(stamps.times) - 2
        if steps != new_tokens:
            raise RuntimeError(f"transformers generated {steps + 1} tokens, {n} expected")
        return steps / (stamps.times[-1] - stamps.times[1])

    def bytes_per_token(self):
        from llm_torch.core.tools.model_size import weight_bytes_per_token

        return weight_bytes_per_token(self.model)

    def batch_decode(self, prompts, new_tokens):
        torch = self.torch
        longest = max(len(p) for p in prompts)
        pad = self.model.config.eos_token_id if self.model.config.pad_token_id is None else self.model.config.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])

        def timed(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=pad)
            return time.perf_counter() - t0

        return len(prompts) * new_tokens / (timed(new_tokens + 1) - timed(1))


class LlamaCpp(Engine):
    key = "llama.cpp"

    def imports(self) -> dict[str, float]:
        t0 = time.perf_counter()
        try:
            import llama_cpp
        except ImportError as e:
            raise Unavailable(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python") from None
        self.version = getattr(llama_cpp, "__version__", "?")
        return {"llama_cpp": time.perf_counter() - t0}

    def load(self, path):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=N_CTX, verbose=False)
        self.path = path
        self.label = f"llama.cpp {self.file_type()} ({self.version})"

    def file_type(self) -> str:
        name = self.path.name.rsplit(".", 2)
        return name[-2] if len(name) == 3 else "gguf"

    def vocab_size(self):
        return self.llm.n_vocab()

    def _greedy(self, ids):
        # reset() first: generate() would otherwise reuse a cached prefix of the previous run's prompt.
        self.llm.reset()
        return self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)

    def prefill(self, ids):
        t0 = time.perf_counter()
        gen = self._greedy(ids)
        next(gen)  # eval of the whole prompt + the first greedy pick
        elapsed = time.perf_counter() - t0
        gen.close()
        return elapsed

    def decode(self, ids, new_tokens):
        gen = self._greedy(ids)
        next(gen)
        t0 = time.perf_counter()
        for _ in range(new_tokens):  # generate() never stops on EOS by itself
            next(gen)
        elapsed = time.perf_counter() - t0
        gen.close()
        return new_tokens / elapsed

    def bytes_per_token(self):
        # Quantized tensors as stored in the file; the embedding lookup reads one row unless the head is tied.
        from gguf import GGUFReader

        reader = GGUFReader(str(self.path))
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        total = sum(sizes.values())
        if "output.weight" in sizes and "token_embd.weight" in sizes:
            emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
            total -= sizes["token_embd.weight"] - sizes["token_embd.weight"] // int(emb.shape[-1])
        return total


def make_engine(key: str) -> Engine:
    if key.startswith("ours-"):
        return Ours(key.removeprefix("ours-"))
    if key.startswith("hf-"):
        return Transformers(key.removeprefix("hf-"))
    if key == "llama.cpp":
        return LlamaCpp()
    raise SystemExit(f"unknown engine '{key}'; choose from {', '.join(ALL_ENGINES)}")


# ------------------------------------------------------------------------------------------- running


@dataclass
class Figures:
    engine: Engine
    imports: dict[str, float] = field(default_factory=dict)
    load_s: float = 0.0
    rss_load: int = 0
    prefill_s: dict[int, list[float]] = field(default_factory=dict)
    decode_tps: list[float] = field(default_factory=list)
    batch_tps: list[float] = field(default_factory=list)
    child: dict | None = None

    def prefill_tps(self, n: int) -> list[float]:
        return [n / s for s in self.prefill_s.get(n, [])]


def median(values):
    return statistics.median(values) if values else None


def child_main(args) -> None:
    """--child: load one engine, run the longest prefill and one decode, print peak RSS as JSON."""
    engine = make_engine(args.child)
    imports = engine.imports()
    path = Path(args.gguf)  # from the parent: finding it here would import llm_torch, hence torch
    before = current_rss()
    t0 = time.perf_counter()
    engine.load(path)
    load_s = time.perf_counter() - t0
    vocab = engine.vocab_size()
    lengths = args.prompt_lengths or [1]
    engine.prefill(random_ids(vocab, max(lengths), args.seed))
    engine.decode(random_ids(vocab, 1, args.seed + 1), args.new_tokens)
    print(json.dumps({"peak_rss": peak_rss(), "rss_before_load": before, "load_s": load_s, "imports": imports}))


def run_child(key: str, args) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--new-tokens", str(args.new_tokens),
           "--prompt-lengths", ",".join(map(str, args.prompt_lengths)), "--seed", str(args.seed), "--gguf", str(gguf_path())]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        print(f"  RSS child for {key} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, prefill 128, 32 new tokens, no RSS children")
    p.add_argument("--engines", default=",".join(ALL_ENGINES), help=f"comma-separated subset of {','.join(ALL_ENGINES)}")
    p.add_argument("--prompt-lengths", default=None, help="prefill lengths (default 128,512)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps (default 128)")
    p.add_argument("--repetitions", type=int, default=None, help="timed rounds after one warm-up (default 3)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-engine child processes that measure peak RSS")
    p.add_argument("--batch", type=int, default=8, help="sequences of the batched decode test (0: skip it)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prompt_lengths = [int(x) for x in (args.prompt_lengths or ("128" if args.quick else "128,512")).split(",") if x.strip()]
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (32 if args.quick else 128)
    args.repetitions = args.repetitions if args.repetitions is not None else (1 if args.quick else 3)
    if max(args.prompt_lengths, default=0) + 1 > N_CTX or args.new_tokens + 2 > N_CTX:
        raise SystemExit(f"prompt lengths and new tokens must fit llama.cpp's context of {N_CTX}")
    if args.child:
        child_main(args)
        return
    keys = [k.strip() for k in args.engines.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ALL_ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ALL_ENGINES)}")

    imports = {"torch": _import_torch()}  # first, so its time is not hidden inside another import
    t0 = time.perf_counter()
    import llm_torch.core.tools.bench  # noqa: F401
    import llm_torch.core.placement.loading  # noqa: F401

    imports["llm_torch"] = time.perf_counter() - t0
    path = gguf_path()
    print(f"model: {path.name} ({path.stat().st_size / 1e6:.0f} MB), threads: {THREADS}, "
          f"repetitions: {args.repetitions} after 1 warm-up, prefill: {args.prompt_lengths}, decode: {args.new_tokens} tokens")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with open(path, "rb") as f:  # into the page cache, so the first engine loaded does not pay the disk
        while f.read(1 << 24):
            pass

    runs: list[Figures] = []
    for key in keys:
        engine = make_engine(key)
        try:
            imports_of = engine.imports()
            before = current_rss()
            t0 = time.perf_counter()
            engine.load(path)
            load_s = time.perf_counter() - t0
        except Unavailable as e:
            print(f"skipped {key}: {e}")
            continue
        except Exception as e:  # one engine failing to load must not lose the others' figures
            print(f"skipped {key}: load failed: {type(e).__name__}: {e}")
            continue
        runs.append(Figures(engine, {k: v for k, v in imports_of.items() if v}, load_s, current_rss() - before))
        print(f"loaded {engine.label} in {load_s:.2f} s" + (f" ({engine.note})" if engine.note else ""))
    if not runs:
        raise SystemExit("no engine could run")

    vocab = min(r.engine.vocab_size() for r in runs)
    prompts = {n: random_ids(vocab, n, args.seed) for n in args.prompt_lengths}
    decode_prompt = random_ids(vocab, 1, args.seed + 1)
    batch_prompts = [random_ids(vocab, 16, args.seed + 2 + i) for i in range(args.batch)]
    for rep in range(-1, args.repetitions):
        print(("warm-up" if rep < 0 else f"repetition {rep + 1}/{args.repetitions}"), end="", flush=True)
        for r in runs:
            for n, ids in prompts.items():
                s = r.engine.prefill(ids)
                if rep >= 0:
                    r.prefill_s.setdefault(n, []).append(s)
            if args.new_tokens:
                tps = r.engine.decode(decode_prompt, args.new_tokens)
                if rep >= 0:
                    r.decode_tps.append(tps)
            if args.new_tokens and args.batch:
                tps = r.engine.batch_decode(batch_prompts, args.new_tokens)
                if rep >= 0 and tps is not None:
                    r.batch_tps.append(tps)
            print(".", end="", flush=True)
        print()

    from llm_torch.core.tools.machine import measure_memory_bandwidth

    _import_torch()
    bandwidth = measure_memory_bandwidth()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if not (args.quick or args.no_rss):
        print("peak RSS: one child process per engine ...", flush=True)
        for r in runs:
            r.child = run_child(r.engine.key, args)

    for r in runs:
        for k, v in r.imports.items():
            imports.setdefault(k, v)  # a library already imported above reports ~0 here
    report(runs, args, bandwidth, imports)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(runs, args, bandwidth, imports), indent=2))


# ------------------------------------------------------------------------------------------- output


def _fmt(v, spec=".1f", unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


def _range(values, spec=".1f"):
    return "" if len(values) < 2 else f" ({min(values):{spec}}-{max(values):{spec}})"


def table(columns: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(columns), sep] + [line(r) for r in rows])


def report(runs: list[Figures], args, bandwidth, imports: dict[str, float]) -> None:
    lengths = args.prompt_lengths
    columns = ["engine", "load s", "load s (own process)"] + [f"prefill {n} tok/s" for n in lengths]
    columns += [f"decode tok/s", "decode % of ceiling", f"decode x{args.batch} tok/s (all)", "RSS +load MiB",
                "peak RSS MiB (own process)"]
    rows = []
    for r in runs:
        row = [r.engine.label, f"{r.load_s:.2f}", f"{r.child['load_s']:.2f}" if r.child else "-"]
        row += [_fmt(median(r.prefill_tps(n))) + _range(r.prefill_tps(n), ".0f") for n in lengths]
        row.append(_fmt(median(r.decode_tps)) + _range(r.decode_tps))
        bpt = r.engine.bytes_per_token()
        ceiling = bandwidth.read_gb_per_s * 1e9 / bpt if bpt else None
        d = median(r.decode_tps)
        row.append(f"{d / ceiling:.0%} of {ceiling:.0f}" if ceiling and d else "-")
        row.append(_fmt(median(r.batch_tps)) + _range(r.batch_tps) if r.batch_tps else "-")
        row.append(f"{r.rss_load / 2**20:.0f}")
        row.append(f"{r.child['peak_rss'] / 2**20:.0f}" if r.child else "-")
        rows.append(row)
    print()
    print(table(columns, rows))

    by_key = {r.engine.key: r for r in runs}
    for base_key in BASELINES:
        base = by_key.get(base_key)
        if base is None:
            print(f"\n(no ratios vs {base_key}: it did not run)")
            continue
        cols = ["engine"] + [f"prefill {n}" for n in lengths] + ["decode", f"decode x{args.batch}", "load (faster = >1)"]
        rows = []
        for r in runs:
            row = [r.engine.label]
            for n in lengths:
                a, b = median(r.prefill_tps(n)), median(base.prefill_tps(n))
                row.append(f"{a / b:.2f}x" if a and b else "-")
            for mine, theirs in ((r.decode_tps, base.decode_tps), (r.batch_tps, base.batch_tps)):
                a, b = median(mine), median(theirs)
                row.append(f"{a / b:.2f}x" if a and b else "-")
            row.append(f"{base.load_s / r.load_s:.2f}x" if r.load_s else "-")
            rows.append(row)
        print(f"\nratios vs {base.engine.label} (speed / its speed; >1 = faster):")
        print(table(cols, rows))

    print()
    print("imports (in this process, once each): " + ", ".join(f"{k} {v:.2f} s" for k, v in imports.items()))
    print("load s: in this process, in the order above (lazy one-time imports fall on the first engine of a library); "
          "own process: a fresh child, cold as a user's first run")
    print(f"memory bandwidth: {bandwidth.read_gb_per_s:.1f} GB/s read (best; median {bandwidth.read_median_gb_per_s:.1f}), "
          f"{bandwidth.threads} threads; ceiling = bandwidth / weight bytes read per token (the engine's own dtype/quant)")
    for r in runs:
        if r.child:
            print(f"  {r.engine.label}: own process peak RSS {r.child['peak_rss'] / 2**20:.0f} MiB "
                  f"(of which {r.child['rss_before_load'] / 2**20:.0f} MiB before load: interpreter + imports), "
                  f"load {r.child['load_s']:.2f} s there")
    print("figures: medians over the repetitions, (min-max) when more than one; prefill = time to first token")


def to_json(runs: list[Figures], args, bandwidth, imports: dict[str, float]) -> dict:
    return {
        "imports_s": imports,
        "threads": THREADS,
        "repetitions": args.repetitions,
        "prompt_lengths": args.prompt_lengths,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "bandwidth_read_gb_per_s": bandwidth.read_gb_per_s,
        "engines": [
            {
                "key": r.engine.key,
                "label": r.engine.label,
                "note": r.engine.note,
                "load_s": r.load_s,
                "rss_load_bytes": r.rss_load,
                "prefill_tokens_per_second": {str(n): r.prefill_tps(n) for n in args.prompt_lengths},
                "decode_tokens_per_second": r.decode_tps,
                "batched_decode_tokens_per_second": r.batch_tps,
                "bytes_per_token": r.engine.bytes_per_token(),
                "child": r.child,
            }
            for r in runs
        ],
    }


if __name__ == "__main__":
    main()
