"""Option aliases shared by commands (one name per concept: max_new_tokens everywhere)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from .completions import complete_model


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Local folder, .gguf file, Hub id (org/name[@rev]) or alias. Default: smollm2.",
        autocompletion=complete_model,
    ),
]
# -m of the commands that also take the model as their first argument and have no default model.
MODEL_OR_ARGUMENT_HELP = "The model, instead of the MODEL argument: local folder, .gguf file, Hub id (org/name[@rev]) or alias."
NamedModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help=MODEL_OR_ARGUMENT_HELP, autocompletion=complete_model),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | N | mps.")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=0, help="Most tokens to generate.")]
# The defaults as core.engine.sampling_spec (DEFAULT_SAMPLING) and core.checkpoint.resolve (EMBEDDED_MODELS) have
# them, written out: importing those would load torch for --help; tests/test_sampling.py keeps them equal.
TemperatureOpt = Annotated[
    Optional[float],
    typer.Option("--temperature", "-t", min=0.0,
                 help="0 = greedy. Default: the model's generation_config (greedy unless it samples; built-in smollm2: "
                      "0.2, top-k 50, top-p 0.9); without one 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1."),
]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0 = off).")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (1 = off).")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", min=0.0, max=1.0, help="Drop tokens below min_p x top prob.")]
RepetitionPenaltyOpt = Annotated[
    Optional[float], typer.Option("--repetition-penalty", min=0.0, help="> 1 discourages repeats (1 = off).")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (repeatable); not printed.")]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the decode step.")]
StatsOpt = Annotated[bool, typer.Option("--stats", help="Print tokens/s, time to first token and peak memory to stderr.")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="text (streamed) or json (one object at the end).")]
DeviceMapOpt = Annotated[
    Optional[str],
    typer.Option("--device-map", help="auto: spread the layers over the GPUs, then the CPU (for models bigger than one device)."),
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print where the weights and KV cache would go and how much memory they need; load nothing."),
]
ChatTemplateOpt = Annotated[
    Optional[str],
    typer.Option("--chat-template", help="A jinja chat template to use instead of the model's: a file, or the template text."),
]
TpOpt = Annotated[
    Optional[int],
    typer.Option("--tp", min=1, help="Split the model over N processes (tensor parallel: torch.distributed, gloo on CPU, NCCL on GPUs)."),
]
QuantizeOpt = Annotated[
    Optional[str],
    typer.Option("--quantize", help="Quantize on load: int8 | int4 | int8-dynamic | nf4 | fp4 | llm-int8 (see llm quantize)."),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="CPU threads for torch and the native kernels (OpenMP). Default: torch's choice."),
]
KvCacheOpt = Annotated[
    str,
    typer.Option("--kv-cache", help="What the KV cache stores: auto | f32 | f16 | bf16 | int8 (per head and block of 32 "
                                    "scales, as llama.cpp's q8_0). auto: f32 for fp32 models on a CPU, f16 for 16-bit "
                                    "and quantized ones; a GPU keeps the model's dtype."),
]
ContextOpt = Annotated[
    Optional[int],
    typer.Option("--context", min=2, help="KV positions per sequence (prompt + answer; perplexity: the window). "
                                          "Default: the model's context."),
]
