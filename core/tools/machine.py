"""Facts of this process and machine for benchmarks: peak RSS, process age, the environment, and the memory
bandwidth that bounds decode speed."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import torch

from llm_torch.core import kernels
from .bench_results import Bandwidth

BANDWIDTH_BUFFER_MIB = 256  # 8x this machine's 32 MiB L3: the reads must come from DRAM


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
