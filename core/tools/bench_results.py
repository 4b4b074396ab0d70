"""What `llm bench` measures and reports: the spec of a run and its results (dataclasses, JSON form)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from llm_torch.core.errors import InputError

DEFAULT_PROMPT_LENGTHS = (128, 512)
DEFAULT_NEW_TOKENS = 128
DEFAULT_REPETITIONS = 3


@dataclass(frozen=True)
class BenchSpec:
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    new_tokens: int = DEFAULT_NEW_TOKENS
    repetitions: int = DEFAULT_REPETITIONS
    warmup: int = 1
    seed: int = 0  # for the random prompt ids: the same prompt every run and every engine
    batches: tuple[int, ...] = ()  # batched decode tests: sequences decoding at once
    context: int | None = None  # KV positions per sequence (--context); None: the model's context

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
    dtype: str  # of the float tensors: all of them, or those a quantization scheme left (norms, embeddings)
    device: str
    params: int  # unique parameters (a tied head counted once)
    weights_bytes: int  # bytes of those parameters (and persistent buffers) in memory
    bytes_per_token: int  # weight bytes one decode step reads (see weight_bytes_per_token)
    quantization: str | None = None  # the scheme the Linears run in (int4-g64-g128, int8 ...); None: float


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
