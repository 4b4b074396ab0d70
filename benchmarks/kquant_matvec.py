"""GB/s of weight read by the native Q4_K / Q5_K / Q6_K products (core/kernels/gguf_k.c) against the int4 x Q8
kernel (quant's int4 layout, group 128) on decode-sized shapes, B = 1 and B = 8.

    .venv/bin/python benchmarks/kquant_matvec.py [--threads 2] [--seconds 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from llm_torch.core import kernels

SHAPES = [(576, 1536), (2048, 2048), (5632, 2048)]  # (N outputs, K inputs); K a multiple of 256


def timed(fn, seconds: float) -> float:
    """The fastest of many runs: on a shared machine the others mostly measure the neighbours."""
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mv = kernels.matvec()
    if mv is None:
        raise SystemExit(kernels.status().detail)
    g = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}; GB/s = weight bytes / time (ms per product in brackets)")
    for N, K in SHAPES:
        cases = {}
        for name, kind in (("q4_k", kernels.Q4_K), ("q5_k", kernels.Q5_K), ("q6_k", kernels.Q6_K)):
            elems, size, _ = kernels.GGUF_BLOCKS[kind]
            raw = torch.randint(0, 256, (N, K // elems * size), dtype=torch.uint8, generator=g)
            raw.view(N, K // elems, size)[..., 208 if kind == kernels.Q6_K else 0] = 0  # finite fp16 d: high byte 0
            spec = kernels.LinearSpec(kind, raw, N, K)
            cases[name] = (raw.numel(), lambda x, s=spec: mv.linear(s, x))
        group = 128
        packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
        scale = torch.rand(N, K // group, generator=g).to(torch.bfloat16)
        zero = torch.rand(N, K // group, generator=g).to(torch.bfloat16)
        cases["i4q8 g128"] = (packed.numel() + 4 * scale.numel(),
                              lambda x: mv.int4(packed, scale, zero, group, x))
        for B in (1, 8):
            x = torch.randn(B, K, generator=g)
            row = []
            for name, (nbytes, fn) in cases.items():
                t = timed(lambda: fn(x), args.seconds)
                row.append(f"{name} {nbytes / t / 1e9:5.1f} ({t * 1e3:.3f})")
            print(f"N={N:5d} K={K:5d} B={B}: " + "  ".join(row))


if __name__ == "__main__":
    main()
