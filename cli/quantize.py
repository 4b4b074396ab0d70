"""`llm quantize`: write a quantized copy of a model (a folder every command opens), estimate one
(--dry-run), or print the report card of one against its float model (--eval, --report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import options as o
from . import render

SCHEME_FLAGS = ("int4", "int8", "int8_dynamic", "nf4", "fp4", "llm_int8")


def quantize(
    model_arg: Annotated[
        Optional[str], typer.Argument(metavar="MODEL", help="The float model (same forms as -m); default: smollm2.", autocompletion=o.complete_model)
    ] = None,
    model: o.ModelOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder. Default: ./<model>-<scheme>.", file_okay=False)] = None,
    int4: Annotated[bool, typer.Option("--int4", help="int4 weight-only (torchao scheme), scales per --group-size inputs.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="int8 weight-only (torchao scheme): the fastest on CPU.")] = False,
    int8_dynamic: Annotated[bool, typer.Option("--int8-dynamic", help="int8 weights and int8 activations (torchao scheme).")] = False,
    nf4: Annotated[bool, typer.Option("--nf4", help="bitsandbytes 4-bit NormalFloat (memory savings; slow on CPU).")] = False,
    fp4: Annotated[bool, typer.Option("--fp4", help="bitsandbytes 4-bit float (memory savings; slow on CPU).")] = False,
    llm_int8: Annotated[bool, typer.Option("--llm-int8", help="bitsandbytes LLM.int8() 8-bit weights.")] = False,
    group_size: Annotated[int, typer.Option("--group-size", help="--int4: inputs per scale, 32 | 64 | 128 | 256.")] = 128,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="--nf4/--fp4: quantize the block scales too.")] = False,
    backend: Annotated[Optional[str], typer.Option("--backend", help="torchao | bitsandbytes, where a scheme has both (--int8).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Keep modules matching PATTERN in full precision (repeatable).")] = None,
    quantize_embeddings: Annotated[bool, typer.Option("--quantize-embeddings", help="Quantize lm_head, task heads and (torchao schemes) the embedding table; the default for --int8, --int4, --int8-dynamic (not task heads).")] = False,
    keep_embeddings: Annotated[bool, typer.Option("--keep-embeddings", help="Keep the embedding table and lm_head in full precision.")] = False,
    dtype: o.DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Estimate the output size and memory; write nothing.")] = False,
    eval: Annotated[bool, typer.Option("--eval", help="Then print the report card against the float model.")] = False,
    report: Annotated[
        Optional[Path], typer.Option("--report", help="Print the report card of an existing quantized folder.", file_okay=False)
    ] = None,
) -> None:
    """Quantize a model and save it as a folder that `llm generate -m`, `llm chat` and `llm bench` open."""
    from llm_torch.core.errors import InputError

    from .model_args import one_model

    model_ref = one_model(model, model_arg)
    chosen = [name for name, on in zip(SCHEME_FLAGS, (int4, int8, int8_dynamic, nf4, fp4, llm_int8)) if on]
    if report is not None:
        if chosen or dry_run or eval:
            raise InputError("--report reads an existing folder", hint="drop the scheme flags, --dry-run and --eval")
        _print_report(model_ref, report)
        return
    if len(chosen) != 1:
        raise InputError(
            "choose one scheme" if not chosen else f"several schemes given: {', '.join('--' + c.replace('_', '-') for c in chosen)}",
            hint="--int8 (fastest), --int4 (smallest), --int8-dynamic, --nf4, --fp4 or --llm-int8",
        )
    from llm_torch.quant.spec import make_spec

    if quantize_embeddings and keep_embeddings:
        raise InputError("--quantize-embeddings and --keep-embeddings contradict each other", hint="give one of them")
    spec = make_spec(chosen[0].replace("_", "-"), backend=backend, group_size=group_size, double_quant=double_quant,
                     skip=tuple(skip or ()), quantize_embeddings=True if quantize_embeddings else False if keep_embeddings else None)
    if dry_run:
        _print_estimate(model_ref, spec, dtype)
        return
    from llm_torch.quant.api import quantize_to_folder

    with render.progress(f"quantizing ({spec.label})", "layers") as update:
        outcome = quantize_to_folder(model_ref, spec, output, dtype=dtype, force=force,
                                     progress=lambda done, total, name: update(done, total, "writing" if done == total else name))
    for note in outcome.result.notes:
        render.warn(note)
    kept = outcome.result.kept
    render.info(
        f"{outcome.result.label}: {len(outcome.result.quantized)} layers quantized, {len(kept)} kept in full precision"
        + (f" ({', '.join(kept)})" if kept and len(kept) <= 4 else "")
        + f"; {outcome.bytes_on_disk / 2**20:.1f} MiB in {outcome.seconds:.1f} s"
    )
    render.write(f"{render.absolute(outcome.out)}\n")  # the folder to pass to -m: the one result on stdout
    if eval:
        _print_report(model_ref, outcome.out)


def _print_estimate(model_ref, spec, dtype) -> None:
    from llm_torch.quant.api import estimate

    e = estimate(model_ref, spec, dtype=dtype)
    for note in e.notes:
        render.warn(note)
    render.write(
        f"{e.label}: {e.quantized_layers} layers to quantize, {e.kept_layers} kept\n"
        f"float weights: {e.float_bytes / 2**20:.1f} MiB\n"
        f"estimated output size: {e.quantized_bytes / 2**20:.1f} MiB ({e.quantized_bytes / e.float_bytes:.2f}x)\n"
        f"estimated weight memory loaded: {e.memory_bytes / 2**20:.1f} MiB ({e.memory_bytes / e.float_bytes:.2f}x)\n"
    )


def _print_report(model_ref: str | None, folder: Path) -> None:
    import json

    from llm_torch.core.errors import InputError
    from llm_torch.quant.report import report_card

    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"{folder} has no config.json", hint="give a folder written by llm quantize")
    try:
        source = model_ref or json.loads(config.read_text(encoding="utf-8")).get("llm_torch_quantized_from")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config} is not valid JSON: {e}") from None
    if not source:
        raise InputError(f"{folder} does not say which float model it came from", hint="give it: llm quantize MODEL --report FOLDER")
    render.info(f"report card: {folder} against {source} (float32); a minute or so")
    with render.progress("report card", "steps") as update:
        cards = report_card(source, folder, progress=update)
    rows = [("", "float", "quantized", "ratio")]

    def row(label, a, b, fmt, ratio=True):
        rows.append((label, fmt(a), fmt(b), f"{b / a:.2f}x" if ratio and a else ""))

    f, q = cards
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f} MiB"  # noqa: E731
    row("size on disk", f.disk_bytes, q.disk_bytes, mib)
    row("weights in memory", f.weights_bytes, q.weights_bytes, mib)
    if f.peak_rss_bytes and q.peak_rss_bytes:
        row("peak RSS loaded", f.peak_rss_bytes, q.peak_rss_bytes, mib)
    row("prefill tok/s", f.prefill_tokens_per_second, q.prefill_tokens_per_second, lambda v: f"{v:.1f}")
    row("decode tok/s", f.decode_tokens_per_second, q.decode_tokens_per_second, lambda v: f"{v:.1f}")
    row("perplexity", f.perplexity, q.perplexity, lambda v: f"{v:.3f}")
    rows.append(("mean KL (nats)", "0", f"{q.mean_kl:.4f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    render.write("".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n" for r in rows))
