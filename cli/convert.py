"""`llm convert`: a checkpoint (HF folder / Hub repo, GGUF file, Meta layout) -> an HF folder or a GGUF file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render
from .completions import complete_model


class Target(str, Enum):
    hf = "hf"
    gguf = "gguf"


class ConvertDtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OutType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes (transformers' spellings)."""
    import re

    from llm_torch.core.errors import InputError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"cannot read the size '{text}'", hint="write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def convert(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder (--to hf) or file (--to gguf) to create.")],
    source: Annotated[Optional[str], typer.Argument(metavar="SRC", help="HF folder, Hub id, .gguf file, alias, or "
                                                    "Meta-layout folder; or -m.", autocompletion=complete_model)] = None,
    model: o.NamedModelOpt = None,
    to: Annotated[Target, typer.Option("--to", help="Output format.")] = Target.hf,
    dtype: Annotated[Optional[ConvertDtype], typer.Option("--dtype", help="hf: weights dtype. Default: the source's "
                                                          "(a quantized GGUF: float16).")] = None,
    outtype: Annotated[OutType, typer.Option("--outtype", help="gguf: tensor type of the matrices.")] = OutType.f16,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="hf: largest safetensors shard, e.g. 5GB, 500MB.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Reload the result and compare logits with the source.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages on stderr.")] = False,
) -> None:
    """Convert a model to a Hugging Face folder or a GGUF file; prints the output path."""
    from llm_torch.core.tools.convert import ConvertSpec
    from llm_torch.core.tools.convert import convert as run

    from .model_args import one_model

    source = one_model(model, source, required="convert")
    spec = ConvertSpec(source=source, output=output, to=to.value, dtype=dtype.value if dtype else None,
                       outtype=outtype.value, max_shard_size=parse_size(max_shard_size), force=force, verify=verify)
    show = not quiet and render.shows_progress()
    if show:
        with render.progress("converting", "B") as update:
            result = run(spec, lambda done, total, name: update(done, total, name))
    else:
        result = run(spec)
    for warning in result.warnings:
        render.warn(warning)
    if result.max_abs_diff is not None and not quiet:
        render.info(f"verify: max |logits difference| {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})")
    if not quiet and show:
        render.info(f"wrote {result.tensors} tensors, {result.bytes_written / 2**20:.1f} MiB in {result.seconds:.1f} s")
    render.write(f"{render.absolute(result.output)}\n")
