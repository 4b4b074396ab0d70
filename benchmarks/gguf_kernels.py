#!/usr/bin/env python
"""Speed of the native products over GGUF's packed blocks (core/kernels/gguf.c) against the other weight
layouts the kernels read, on decode-shaped matrices (SmolLM2-135M's: hidden 576, MLP 1536, vocab 49152).

    python benchmarks/gguf_kernels.py                 # torch's thread count, B = 1 and 8
    python benchmarks/gguf_kernels.py --threads 1 --batch 1
    python benchmarks/gguf_kernels.py --batch 1 8 32 128 --shapes 2048x2048 5632x2048   # prefill-sized products

Each row calls the C entry point directly through ctypes with buffers allocated once (no Python-side
allocation or checks), repeats it for about --seconds, and reports the median time per call of --repeats
such runs, the fastest run, the weight bytes read per second at the fastest run (every weight is read once
per call whatever B is), and the median process CPU time per call (on a busy machine the fastest run and,
with --threads 1, the CPU time are closer to the kernel's own cost). The two small matrices (0.5-1.8 MB)
stay in the CPU caches between calls; the 49152-row one (16-57 MB) is read from memory, as decode reads
every weight. The
weights are random bytes with valid fp16 block scales: speed does not depend on the values. On a shared
machine, compare rows of one run.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

# The CLI's OpenMP setting (before anything imports torch): short busy-waits between parallel regions.
from llm_torch.core.openmp import tune_openmp

tune_openmp()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_torch.core import kernels  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (49152, 576)]


def loaded_library() -> ctypes.CDLL:
    """The kernel library MatVec loaded (same handle: the path from this process's mappings)."""
    if kernels.matvec() is None:
        raise SystemExit(f"native kernels unavailable: {kernels.status().detail}")
    root = str(kernels.cache_dir())
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if path.startswith(root) and path.endswith(".so"):
            return ctypes.CDLL(path)
    raise SystemExit("the kernel library is not mapped in this process")


def gguf_blocks(kind: int, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    elems, size, _ = kernels.GGUF_BLOCKS[kind]
    raw = rng.integers(0, 256, (n, k // elems, size), dtype=np.uint8)
    halves = 2 if kind == kernels.Q4_1 else 1  # d (and m) as the first fp16 values of each block
    raw[:, :, : 2 * halves] = np.full((n, k // elems, halves), 0.01, np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def cases(lib, n: int, k: int, B: int, threads: int):
    """(label, weight bytes, call) per layout; every call writes y [B, n] from x [B, k]."""
    rng = np.random.default_rng(0)
    x, y, bias = torch.randn(B, k), torch.empty(B, n), None
    P, I = ctypes.c_void_p, ctypes.c_int64
    out = []
    w16 = torch.randn(n, k).half()
    f16 = lib.llm_gemm_f16
    f16.argtypes, f16.restype = [P, P, I, P, P, I, I, I, I, ctypes.c_int], None
    out.append(("F16", 2 * n * k, lambda: f16(w16.data_ptr(), x.data_ptr(), k, bias, y.data_ptr(), n, B, n, k, threads)))
    q8row = lib.llm_q8_row_bytes
    q8row.argtypes, q8row.restype = [I], I
    scratch = torch.empty(B * q8row(k), dtype=torch.uint8)
    qi8, sc = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100
    i8q8 = lib.llm_gemm_i8q8
    i8q8.argtypes, i8q8.restype = [P, P, P, I, P, P, I, I, I, I, P, ctypes.c_int], None
    out.append(("I8Q8", n * k + 4 * n, lambda: i8q8(qi8.data_ptr(), sc.data_ptr(), x.data_ptr(), k, bias, y.data_ptr(),
                                                   n, B, n, k, scratch.data_ptr(), threads)))
    G = 32
    qi4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s4, z4 = (torch.rand(n, k // G) / 10).bfloat16(), (torch.randn(n, k // G) / 10).bfloat16()
    i4q8 = lib.llm_gemm_i4q8
    i4q8.argtypes, i4q8.restype = [P, P, P, P, I, P, P, I, I, I, I, I, P, ctypes.c_int], None
    out.append((f"I4Q8 g{G}", n * k // 2 + 4 * n * k // G,
                lambda: i4q8(qi4.data_ptr(), s4.data_ptr(), z4.data_ptr(), x.data_ptr(), k, bias, y.data_ptr(), n, B, n,
                             k, G, scratch.data_ptr(), threads)))
    for kind, (_, _, name) in kernels.GGUF_BLOCKS.items():
        w = gguf_blocks(kind, n, k, rng)
        fn, act = getattr(lib, f"llm_gemm_{name}"), getattr(lib, f"llm_{name}_act_bytes")
        fn.argtypes, fn.restype = [P, P, I, P, P, I, I, I, I, P, ctypes.c_int], None
        act.argtypes, act.restype = [I], I
        s = torch.empty(B * act(k), dtype=torch.uint8)
        out.append((name.upper(), w.numel(), lambda fn=fn, w=w, s=s: fn(w.data_ptr(), x.data_ptr(), k, bias, y.data_ptr(),
                                                                       n, B, n, k, s.data_ptr(), threads)))
    return out


def time_call(call, seconds: float, repeats: int) -> tuple[float, float, float]:
    """(median wall, fastest wall, median CPU) seconds per call."""
    call()
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        call()
        reps += 1
    per_run = max(1, int(reps * 4 / repeats))
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per_run):
            call()
        wall.append((time.perf_counter() - t0) / per_run)
        cpu.append((time.process_time() - c0) / per_run)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="N x K per matrix, e.g. 2048x2048")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    lib = loaded_library()
    print(f"threads {args.threads}; median and fastest of {args.repeats} runs; GB/s = weight bytes per second at the fastest")
    print(f"{'N x K':>12} {'B':>3} {'layout':>9} {'MB':>7} {'us/call':>9} {'best us':>9} {'GB/s':>6} {'cpu us':>9}")
    for n, k in shapes:
        for B in args.batch:
            for label, size, call in cases(lib, n, k, B, args.threads):
                t, best, cpu = time_call(call, args.seconds, args.repeats)
                print(f"{f'{n} x {k}':>12} {B:>3} {label:>9} {size / 1e6:>7.2f} {t * 1e6:>9.1f} {best * 1e6:>9.1f} "
                      f"{size / best / 1e9:>6.1f} {cpu * 1e6:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
