"""Quantization schemes: one frozen QuantSpec per request, a registry of what each scheme is and which
backend runs it. No torch import here: the CLI parses and validates flags before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_torch.core.errors import InputError, UnsupportedError

GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 128
# Kept in full precision unless asked (--quantize-embeddings): quality suffers most there, and a tied
# head shares its table with the embedding lookup.
DEFAULT_KEEP = ("lm_head", "score", "qa_outputs")
TASK_HEADS = ("score", "qa_outputs")  # kept even where the embeddings are quantized by default
# int8 / int4 / int8-dynamic on the CPU quantize the embedding table (int8 rows) and the head by default:
# a tied head then reads the int8 table (SmolLM2: 57 of 123 MB a token read from the fp16 head before).
# The rule: on by default where the report card against the float model (llm quantize --report) says it
# costs at most +0.01 nats of mean KL and +1% perplexity over keeping them (README, quantize section).
EMBEDDINGS_BY_DEFAULT = ("int8", "int4", "int8-dynamic")


@dataclass(frozen=True)
class Scheme:
    name: str  # the CLI name: --int4, --quantize int4
    backends: tuple[str, ...]  # the first is the default
    bits: float  # stored bits per quantized weight (scales excluded), for --dry-run estimates
    summary: str
    cuda_only: bool = False


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", ("torchao", "bitsandbytes"), 8, "int8 weights, one scale per output row"),
        Scheme("int4", ("torchao",), 4, "int4 weights, a scale and zero point per group of --group-size inputs"),
        Scheme("int8-dynamic", ("torchao",), 8, "int8 weights and int8 activations (per-token scales)"),
        Scheme("nf4", ("bitsandbytes",), 4, "bitsandbytes 4-bit NormalFloat, blocks of 64"),
        Scheme("fp4", ("bitsandbytes",), 4, "bitsandbytes 4-bit float, blocks of 64"),
        Scheme("llm-int8", ("bitsandbytes",), 8, "bitsandbytes LLM.int8() weights (int8 + row scales)"),
        Scheme("float8", ("torchao",), 8, "torchao float8 dynamic activations and weights", cuda_only=True),
    )
}
# Names the Hub / torchao use for the same thing.
ALIASES = {"int8_weight_only": "int8", "int4_weight_only": "int4", "int8wo": "int8", "int4wo": "int4",
           "int8_dynamic": "int8-dynamic", "int8dq": "int8-dynamic", "llm_int8": "llm-int8", "bnb-int8": "llm-int8",
           "float8_dynamic": "float8", "fp8": "float8"}
BACKENDS = ("torchao", "bitsandbytes")


@dataclass(frozen=True)
class QuantSpec:
    scheme: str
    backend: str
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only
    double_quant: bool = False  # nf4 / fp4 only: quantize the block scales too
    skip: tuple[str, ...] = field(default=DEFAULT_KEEP)  # module name patterns kept in full precision
    quantize_embeddings: bool = False

    @property
    def label(self) -> str:
        """Short name of the request: int4-g128, nf4-dq, llm-int8 ... (swap.applied_label: as applied)."""
        return scheme_label(self.runtime_scheme, group_sizes=(self.group_size,), double_quant=self.double_quant)

    @property
    def runtime_scheme(self) -> str:
        """bitsandbytes' int8 is LLM.int8(): the same stored format as --llm-int8."""
        return "llm-int8" if self.scheme == "int8" and self.backend == "bitsandbytes" else self.scheme


def scheme_label(scheme: str, *, group_sizes=(), double_quant: bool = False) -> str:
    """Short name of a runtime scheme for folders and reports: int4 lists every group size its layers use
    (int4-g64-g128: SmolLM2's 576-wide inputs cannot take groups of 128), nf4-dq, llm-int8 ..."""
    name = scheme
    if scheme == "int4":
        name += "".join(f"-g{g}" for g in sorted(set(group_sizes)))
    return name + ("-dq" if double_quant else "")


def make_spec(
    scheme: str,
    *,
    backend: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    double_quant: bool = False,
    skip: tuple[str, ...] | list[str] = (),
    quantize_embeddings: bool | None = None,
    cuda: bool = False,
) -> QuantSpec:
    """Validate a scheme request (CLI flags or `--quantize NAME`) into a QuantSpec. cuda: the model will be
    on a CUDA GPU (quant/cuda.py), where the CUDA-only schemes run too. quantize_embeddings: None is the
    scheme's default (EMBEDDINGS_BY_DEFAULT on the CPU), True / False force it (task heads too when True)."""
    name = ALIASES.get(scheme.strip().lower(), scheme.strip().lower())
    if name not in SCHEMES:
        raise InputError(f"unknown quantization scheme '{scheme}'", hint=f"use one of: {', '.join(n for n in SCHEMES if not SCHEMES[n].cuda_only)}")
    s = SCHEMES[name]
    if s.cuda_only and not cuda:
        raise UnsupportedError(
            f"{name} needs a CUDA GPU (its torchao kernels have no CPU implementation)",
            hint="on this machine use --int8 (fastest), --int4 (smallest) or --nf4",
        )
    backend = (backend or s.backends[0]).lower()
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}'", hint=f"use {' or '.join(BACKENDS)}")
    if backend not in s.backends:
        raise InputError(f"{name} is not available with --backend {backend}", hint=f"{name} runs on: {', '.join(s.backends)}")
    if name == "int4" and group_size not in GROUP_SIZES:
        raise InputError(f"--group-size {group_size} is not supported", hint=f"use one of {', '.join(map(str, GROUP_SIZES))}")
    if double_quant and name not in ("nf4", "fp4"):
        raise InputError("--double-quant applies to --nf4 and --fp4 only")
    if quantize_embeddings is None:
        embeddings = name in EMBEDDINGS_BY_DEFAULT and backend == "torchao" and not cuda
        keep = TASK_HEADS if embeddings else DEFAULT_KEEP
    else:
        embeddings, keep = quantize_embeddings, () if quantize_embeddings else DEFAULT_KEEP
    return QuantSpec(name, backend, group_size, double_quant, tuple(dict.fromkeys([*keep, *skip])), embeddings)
