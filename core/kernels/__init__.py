"""Native kernels for decode and small batches, built on first use with the system C compiler: gemm.c
(matrix products for B rows, every weight read once for all of them), gguf.c and gguf_k.c (the same for
GGUF's Q4_0 / Q4_1 / Q8_0 and Q4_K / Q5_K / Q6_K blocks as stored in the file) and step.c (a whole
forward step over all layers for a batch of token rows, driven by core.engine.native_step).

Decode reads every weight once per token; on the AVX2 CPUs this targets, torch's kernels for a
[N, K] x [K] product reach about half the memory bandwidth (gemm.c says more). The library is built
for the best instruction set the CPU has (ISAS; LLM_ISA=avx2|avx512 forces one), compiled once per
machine into the user cache (keyed by source, compiler and flags) and loaded with ctypes. Where it
cannot be used (another CPU, no compiler, LLM_KERNELS=torch), `status()` says why and the PyTorch
layers run: callers report which path runs, nothing falls back silently.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_torch.core.phases import mark

SOURCES = tuple(Path(__file__).with_name(name) for name in ("gemm.c", "gguf.c", "gguf_k.c", "step.c"))
# -ffp-contract=off: only the explicit FMA intrinsics fuse; GCC would otherwise contract a*b+c in some
# inlined copies of a tile and not others, and a row would round differently alone and batched.
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
ABI = 11
# A first build takes ~30 s of both cores here; under heavy load several times that.
BUILD_SECONDS = 600
# Instruction sets the sources are built for, best first: compiler flags, the /proc/cpuinfo flags they
# need, and the name status() gives. Each builds its own library (the cache key holds its flags); a row's
# logits are bitwise the same alone or batched within one ISA, not across them (wider sums round apart).
AVX2_FLAGS = ("-mavx2", "-mfma", "-mf16c")
ISAS = {
    "avx512": (AVX2_FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
               ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "AVX-512 VNNI"),
    "avx2": (AVX2_FLAGS, ("avx2", "fma", "f16c"), "AVX2"),
}
REQUIRED_CPU_FLAGS = ISAS["avx2"][1]


@dataclass(frozen=True)
class KernelStatus:
    active: bool
    detail: str  # what runs decode's products, or why the native kernels do not


# Weight layouts the kernels multiply by; values mirror step.c's enum.
F32, F16, BF16, I8, I8Q8, I4Q8 = range(6)
Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = range(6, 12)
FLOAT_KINDS = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
# GGUF's packed blocks, multiplied as they lie in the file: kind -> (weights per block, bytes per block,
# name of the C entry points llm_gemm_<name> / llm_<name>_act_bytes).
GGUF_BLOCKS = {Q4_0: (32, 18, "q4_0"), Q4_1: (32, 20, "q4_1"), Q8_0: (32, 34, "q8_0"),
               Q4_K: (256, 144, "q4_k"), Q5_K: (256, 176, "q5_k"), Q6_K: (256, 210, "q6_k")}


@dataclass(frozen=True)
class LinearSpec:
    """One projection as the kernels read it: kind (F32 ... Q6_K), weight [n, k] (int4: packed [n, k/2];
    GGUF kinds: uint8 [n, row bytes], each row's blocks as in the file), int8: fp32 row scales; int4: bf16
    scale/zero [n, k/group]; optional fp32 bias [n]."""

    kind: int
    weight: torch.Tensor
    n: int
    k: int
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    group: int = 0


# ctypes mirrors of step.c's structs (tests/test_kernels.py checks the layout against the C side).
class CLinear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64)]


class CLayer(ctypes.Structure):
    _fields_ = [("proj", CLinear * 3), ("o", CLinear), ("up", CLinear * 2), ("down", CLinear),
                ("norm", ctypes.c_void_p * 4), ("n_proj", ctypes.c_int64), ("n_up", ctypes.c_int64),
                ("window", ctypes.c_int64)]


class CModel(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "hidden", "inter", "heads", "kv_heads", "head_dim", "vocab", "sandwich", "act")] + [
        ("eps", ctypes.c_double), ("scale", ctypes.c_double), ("softcap", ctypes.c_double),
        ("layers", ctypes.POINTER(CLayer)), ("final_norm", ctypes.c_void_p), ("head", CLinear)]


# KV cache formats step.c reads and writes (its KV_F32 ...), by kv_cache.FORMATS name.
KV_KINDS = {"f32": 0, "f16": 1, "bf16": 2, "int8": 3}


class CCache(ctypes.Structure):
    _fields_ = [("k", ctypes.POINTER(ctypes.c_void_p)), ("v", ctypes.POINTER(ctypes.c_void_p)),
                ("cap", ctypes.POINTER(ctypes.c_int64)), ("n_slots", ctypes.c_int64), ("kind", ctypes.c_int64),
                ("ks", ctypes.POINTER(ctypes.c_void_p)), ("vs", ctypes.POINTER(ctypes.c_void_p))]


def struct_layout() -> list[int]:
    """What step.c's llm_struct_layout reports, computed from the ctypes mirrors (same order)."""
    return [ctypes.sizeof(CLinear), CLinear.bias.offset, CLinear.group.offset,
            ctypes.sizeof(CLayer), CLayer.o.offset, CLayer.down.offset, CLayer.norm.offset, CLayer.window.offset,
            ctypes.sizeof(CModel), CModel.act.offset, CModel.eps.offset, CModel.layers.offset, CModel.head.offset,
            ctypes.sizeof(CCache), CCache.cap.offset, CCache.n_slots.offset, CCache.kind.offset, CCache.ks.offset,
            CCache.vs.offset]


_P, _I = ctypes.c_void_p, ctypes.c_int64


class MatVec:
    """The loaded kernels: y = W @ x (+ bias) for fp32 x [K] (or B rows [B, K]) and a contiguous
    fp32 / fp16 / bf16 / int8 / int4 / GGUF-block W on the CPU (`kinds`: the layouts this library multiplies),
    and step.c's whole-stack forward (`forward_rows`)."""

    def __init__(self, lib: ctypes.CDLL, step: bool = True):
        self.kinds = frozenset({F32, F16, BF16, I8, I8Q8, I4Q8})
        self.forward_rows = lib.llm_forward_rows if step else None
        if step:
            self.forward_rows.argtypes = [ctypes.POINTER(CModel), ctypes.POINTER(CCache), _I, _P, _P, _P, _P, _P, _I,
                                          _P, _P, _P, _P, ctypes.c_int]
            self.forward_rows.restype = ctypes.c_int
        self.step_work_floats = lib.llm_step_work_floats
        self.step_work_floats.argtypes = [ctypes.POINTER(CModel), _I, _I, ctypes.c_int]
        self.step_work_floats.restype = _I
        self.step_scratch_bytes = lib.llm_step_scratch_bytes
        self.step_scratch_bytes.argtypes, self.step_scratch_bytes.restype = [ctypes.POINTER(CModel), _I], _I
        self.struct_layout = lib.llm_struct_layout
        self.struct_layout.argtypes, self.struct_layout.restype = [_P], _I
        self.q8_row_bytes = lib.llm_q8_row_bytes
        self.q8_row_bytes.argtypes, self.q8_row_bytes.restype = [_I], _I
        float_sig = [_P, _P, _I, _P, _P, _I, _I, _I, _I, ctypes.c_int]
        self._fns = {}
        for dtype, name in ((torch.float32, "llm_gemm_f32"), (torch.float16, "llm_gemm_f16"), (torch.bfloat16, "llm_gemm_bf16")):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = float_sig, None
            self._fns[dtype] = fn
        self._i8 = lib.llm_gemm_i8
        self._i8.argtypes, self._i8.restype = [_P, _P, _P, _I, _P, _P, _I, _I, _I, _I, ctypes.c_int], None
        self._i8q8 = lib.llm_gemm_i8q8
        self._i8q8.argtypes, self._i8q8.restype = [_P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int], None
        self._i4q8 = lib.llm_gemm_i4q8
        self._i4q8.argtypes = [_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _P, ctypes.c_int]
        self._i4q8.restype = None
        self._gguf = {}  # kind -> (gemm, act_bytes)
        for kind, (_, _, name) in GGUF_BLOCKS.items():
            gemm, act = getattr(lib, f"llm_gemm_{name}"), getattr(lib, f"llm_{name}_act_bytes")
            gemm.argtypes, gemm.restype = [_P, _P, _I, _P, _P, _I, _I, _I, _I, _P, ctypes.c_int], None
            act.argtypes, act.restype = [_I], _I
            self._gguf[kind] = (gemm, act)
        self.kinds = frozenset((F32, F16, BF16, I8, I8Q8, I4Q8, *self._gguf))

    def __call__(self, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """w [N, K] float, x [K] or [B, K] fp32 -> y [N] or [B, N] (fp32); w a contiguous fp32 / fp16 / bf16 CPU
        tensor, bias None or a contiguous fp32 [N]."""
        N, K = w.shape
        if x.shape[-1] != K:
            raise ValueError(f"matvec: x has {x.shape[-1]} values, the weight {K} columns")
        X = x.reshape(-1, K).contiguous()
        B = X.shape[0]
        y = torch.empty(B, N, dtype=torch.float32)
        self._fns[w.dtype](w.data_ptr(), X.data_ptr(), K, _ptr(bias), y.data_ptr(), N, B, N, K, torch.get_num_threads())
        return y.view(*x.shape[:-1], N)

    def linear(self, spec: LinearSpec, x: torch.Tensor) -> torch.Tensor:
        """y [..., n] = the product `spec` describes (a layer's native_linear()) for fp32 x [..., k]."""
        if spec.kind in (I8, I8Q8):
            return self.int8(spec.weight, spec.scale, x, spec.bias, q8=spec.kind == I8Q8)
        if spec.kind == I4Q8:
            return self.int4(spec.weight, spec.scale, spec.zero, spec.group, x, spec.bias)
        if spec.kind in self._gguf:
            return self.gguf(spec.kind, spec.weight, spec.n, spec.k, x, spec.bias)
        return self(spec.weight, x, spec.bias)

    def gguf(self, kind: int, w: torch.Tensor, n: int, k: int, x: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """w uint8 [n, row bytes]: GGUF blocks of `kind` (GGUF_BLOCKS), x fp32 [..., k] -> y fp32 [..., n].
        x is rounded per block as llama.cpp's matching activations (Q8_0 / Q8_1 blocks of 32, Q8_K of 256);
        integer dot products."""
        elems, size, name = GGUF_BLOCKS[kind]
        _check(k > 0 and k % elems == 0, f"{name} matvec: {k} inputs is not a multiple of {elems}")
        row_bytes = k // elems * size
        _check(w.dtype == torch.uint8 and w.device.type == "cpu" and w.is_contiguous() and tuple(w.shape) == (n, row_bytes),
               f"{name} matvec: weight must be contiguous uint8 [{n}, {row_bytes}] on the CPU, not {w.dtype} {list(w.shape)}")
        _check(x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] == k,
               f"{name} matvec: x must be fp32 [..., {k}] on the CPU")
        _check(bias is None or (bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == n),
               f"{name} matvec: bias must be fp32 [{n}]")
        gemm, act_bytes = self._gguf[kind]
        X = x.reshape(-1, k).contiguous()
        B = X.shape[0]
        y = torch.empty(B, n, dtype=torch.float32)
        scratch = torch.empty(B * act_bytes(k), dtype=torch.uint8)
        gemm(w.data_ptr(), X.data_ptr(), k, _ptr(bias), y.data_ptr(), n, B, n, k, scratch.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], n)

    def int8(self, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
             *, q8: bool = False) -> torch.Tensor:
        """q int8 [N, K] (row-major), scale fp32 [N], x fp32 [..., K] -> y = scale * (q @ x) (+ bias), fp32 [..., N].

        q8: round x to int8 per block of 32 (one fp32 scale each, llama.cpp's Q8_0) and use integer
        dot products: ~1.5x faster here, within half a rounding step of x per input; K % 32 == 0.
        """
        N, K = q.shape
        _check(q.dtype == torch.int8 and q.is_contiguous() and x.shape[-1] == K, "int8 matvec: bad weight or input")
        _check(scale.dtype == torch.float32 and scale.is_contiguous() and scale.numel() == N, "int8 matvec: scale must be fp32 [N]")
        _check(not q8 or K % 32 == 0, f"int8 x q8 matvec: {K} inputs is not a multiple of 32")
        X = x.reshape(-1, K).contiguous()
        B = X.shape[0]
        y, b = torch.empty(B, N, dtype=torch.float32), _ptr(bias)
        threads = torch.get_num_threads()
        if q8:
            scratch = torch.empty(B * self.q8_row_bytes(K), dtype=torch.uint8)
            self._i8q8(q.data_ptr(), scale.data_ptr(), X.data_ptr(), K, b, y.data_ptr(), N, B, N, K, scratch.data_ptr(), threads)
        else:
            self._i8(q.data_ptr(), scale.data_ptr(), X.data_ptr(), K, b, y.data_ptr(), N, B, N, K, threads)
        return y.view(*x.shape[:-1], N)

    def int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, x: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """q uint8 [N, K/2] (low nibble = even column), scale/zero bf16 [N, K/group] with
        w = (code - 8) * scale + zero; x fp32 [..., K] -> y fp32 [..., N]. group_size: a multiple of 32 dividing K.
        x is rounded to Q8 blocks of 32 for the (code - 8) * scale part (as llama.cpp's Q4 x Q8 product;
        widening each code to fp32 instead was slower than torch's own int4 kernel); the zero part keeps
        exact fp32 sums of x."""
        N, K = q.shape[0], q.shape[1] * 2
        _check(q.dtype == torch.uint8 and q.is_contiguous() and x.shape[-1] == K, "int4 matvec: bad weight or input")
        _check(group_size % 32 == 0 and K % group_size == 0, f"int4 matvec: group size {group_size} must be a multiple of 32 dividing {K}")
        for t in (scale, zero):
            _check(t.dtype == torch.bfloat16 and t.is_contiguous() and tuple(t.shape) == (N, K // group_size),
                   "int4 matvec: scale/zero must be bf16 [N, K/group]")
        X = x.reshape(-1, K).contiguous()
        B = X.shape[0]
        y, b = torch.empty(B, N, dtype=torch.float32), _ptr(bias)
        scratch = torch.empty(B * self.q8_row_bytes(K), dtype=torch.uint8)
        self._i4q8(q.data_ptr(), scale.data_ptr(), zero.data_ptr(), X.data_ptr(), K, b, y.data_ptr(), N, B, N, K,
                   group_size, scratch.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], N)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


_STATE: tuple[MatVec | None, KernelStatus] | None = None


def matvec() -> MatVec | None:
    """The native kernels, or None where they cannot run (see status())."""
    return _load()[0]


def status() -> KernelStatus:
    return _load()[1]


def _load() -> tuple[MatVec | None, KernelStatus]:
    global _STATE
    if _STATE is None:
        _STATE = _try_load()
        mark("kernel library")
    return _STATE


def _try_load() -> tuple[MatVec | None, KernelStatus]:
    choice = os.environ.get("LLM_KERNELS", "auto").lower()
    if choice == "torch":
        return None, KernelStatus(False, "torch kernels (LLM_KERNELS=torch)")
    if choice not in ("auto", "matvec"):
        return None, KernelStatus(False, f"torch kernels (LLM_KERNELS={choice!r}: use auto, matvec or torch)")
    isa, reason = _select()
    if isa is not None:
        try:
            lib = ctypes.CDLL(str(_build(isa)))
            if lib.llm_kernels_abi() != ABI:
                reason = "the cached kernel library is from another version"
            else:
                name = ISAS[isa][2]
                if choice == "matvec":  # the products only; the layers run as PyTorch ops
                    return MatVec(lib, step=False), KernelStatus(True, f"native {name} matvec kernels (LLM_KERNELS=matvec)")
                return MatVec(lib), KernelStatus(True, f"native {name} kernels")
        except (OSError, subprocess.SubprocessError, _BuildError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None, KernelStatus(False, f"torch kernels (native ones unavailable: {reason})")


class _BuildError(Exception):
    pass


def _unsupported_reason() -> str | None:
    return _select()[1]


def _select() -> tuple[str | None, str | None]:
    """(the ISA to build, None) or (None, why none can run): a function of the platform, the CPU's flags,
    LLM_ISA and the compiler only, so a machine always runs the same build."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"built for x86-64 Linux, this is {sys.platform} {platform.machine()}"
    try:
        flags = cpu_flags()
    except OSError as e:
        return None, f"cannot read /proc/cpuinfo: {e.strerror or e}"
    isa, reason = choose_isa(flags, os.environ.get("LLM_ISA", "auto"))
    if isa is not None and _compiler() is None:
        return None, "no C compiler found (set CC, or install gcc)"
    return isa, reason


def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (raises OSError where it cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    return frozenset(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))


def runnable_isas() -> list[str]:
    """The instruction sets this CPU runs, best first: what LLM_ISA may force here (none where /proc/cpuinfo
    cannot be read)."""
    try:
        flags = cpu_flags()
    except OSError:
        return []
    return [isa for isa in ISAS if choose_isa(flags, isa)[0] is not None]


def choose_isa(flags: frozenset[str], requested: str) -> tuple[str | None, str | None]:
    """LLM_ISA=auto takes the best ISA the CPU has; avx512 / avx2 that one, or (None, why) where it lacks it."""
    requested = requested.lower()
    if requested != "auto" and requested not in ISAS:
        return None, f"LLM_ISA={requested!r}: use auto, {', '.join(ISAS)}"
    for isa, (_, needs, name) in ISAS.items():
        if requested not in ("auto", isa):
            continue
        missing = [f for f in needs if f not in flags]
        if not missing:
            return isa, None
        if requested == isa:
            return None, f"LLM_ISA={isa} but this CPU lacks {', '.join(missing)}"
    return None, f"this CPU lacks {', '.join(f for f in REQUIRED_CPU_FLAGS if f not in flags)}"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    root = os.environ.get("LLM_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-torch" / "kernels"


def _build(isa: str) -> Path:
    """Compile the sources once per (sources, compiler, flags, ISA); later runs load the cached library."""
    cc = _compiler()
    assert cc is not None  # checked by _select
    flags = (*FLAGS, *ISAS[isa][0])
    source = b"\0".join(p.read_bytes() for p in SOURCES)
    key = hashlib.sha256(source + "\0".join((cc, *flags, *LIBS)).encode()).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"kernels-{isa}-{key}.so"
    if target.is_file():
        return target
    import fcntl  # Linux only, as the kernels (checked before any build)

    folder.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache: a process that finds another compiling waits for its library instead of
    # compiling beside it (each build takes the machine's cores for tens of seconds).
    with open(folder / f".kernels-{isa}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _compile(cc, flags, folder, target)
    return target


def _compile(cc: str, flags: tuple[str, ...], folder: Path, target: Path) -> None:
    """Each source to an object in parallel (the cores this machine has), then one link; built beside the
    target and renamed, so an interrupted build never leaves a torn file. The time limit is generous: a build
    that stops early would leave the process on the torch kernels."""
    work = Path(tempfile.mkdtemp(prefix=".kernels-", dir=folder))
    try:
        objects = [work / f"{src.stem}.o" for src in SOURCES]
        jobs = [subprocess.Popen([cc, *flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for src, obj in zip(SOURCES, objects)]
        deadline = time.monotonic() + BUILD_SECONDS
        try:
            for job in jobs:
                out = job.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                if job.returncode != 0:
                    raise _BuildError(f"{Path(cc).name} failed: {out.strip()[:200]}")
        finally:
            for job in jobs:
                if job.poll() is None:
                    job.kill()
                    job.wait()
        tmp = work / target.name
        done = subprocess.run([cc, *flags, *map(str, objects), "-o", str(tmp), *LIBS], capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
        if done.returncode != 0:
            raise _BuildError(f"{Path(cc).name} failed: {(done.stderr or done.stdout).strip()[:200]}")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
