"""OpenMP settings that must be in the environment before torch loads libgomp (it reads them once).

Imports nothing heavy, so the CLI, the test suite and the benchmark script can call it first.
"""

from __future__ import annotations

import os


def tune_openmp() -> None:
    """Shorten OpenMP's busy-wait unless the user chose a policy (GOMP_SPINCOUNT or OMP_WAIT_POLICY).

    libgomp's threads spin ~300k iterations after each parallel region; when another process holds
    a core, torch's 2 threads then wait on each other for whole scheduler slices. Measured on 2 cores
    with a busy neighbour: decode 0.4-0.7 -> 4-6 tok/s with GOMP_SPINCOUNT=1000, and the same
    ~20 tok/s on an idle machine (OMP_WAIT_POLICY=PASSIVE costs 8% idle).
    """
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "1000"


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads (None: keep torch's choice); -> the count in effect.

    torch's intra-op pool and our native kernels share it: the kernels pass torch.get_num_threads() to
    their `omp parallel for num_threads(...)`. OMP_NUM_THREADS is set too, for OpenMP code started later
    (e.g. a tensor-parallel rank launched from this process)."""
    import torch

    from .errors import InputError

    if threads is not None:
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return torch.get_num_threads()
