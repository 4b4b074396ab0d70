"""`llm bench`: load time, prefill and decode tokens/s, peak RSS and the decode ceiling, like llama-bench.

A Rich table on a terminal, a plain Markdown table when piped (pasteable into an issue), or one JSON
object with --format json. Progress (runs done, ETA) goes to stderr, only on a terminal.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import render
from .option_groups import Model, Output, group, with_groups


def _parse_counts(text: str, flag: str, example: str) -> tuple[int, ...]:
    from llm_torch.core.errors import InputError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        counts = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"{flag} must be integers separated by commas, got '{text}'", hint=f"e.g. {flag} {example}") from None
    if any(n < 1 for n in counts):
        raise InputError(f"{flag} values must be >= 1, got '{text}'")
    return counts


@with_groups
def bench(
    prompt_lengths: Annotated[
        str, typer.Option("--prompt-lengths", "-p", help="Prefill tests: prompt lengths in tokens, comma-separated ('' for none).")
    ] = "128,512",
    new_tokens: Annotated[int, typer.Option("--new-tokens", "-n", min=0, help="Decode test: tokens generated (0 = skip).")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Timed runs per test (after one warm-up).")] = 3,
    batch: Annotated[
        str, typer.Option("--batch", "-b", help="Batched decode tests: sequences decoding at once, comma-separated (e.g. 1,4,8,16).")
    ] = "",
    model: Model = group(Model, exclude=("device_map", "tp", "compile", "dry_run", "chat_template"),
                         names={"threads": ("-t",)}),
    output: Output = group(Output, exclude=("stats",), help={"format": "text (a table) or json (one object)."}),
) -> None:
    """Measure load time, prefill and decode speed, peak memory and the decode ceiling of a model."""
    lengths = _parse_counts(prompt_lengths, "--prompt-lengths", "128,512")  # before importing torch: a typo fails at once
    batches = _parse_counts(batch, "--batch", "1,4,8,16")
    from llm_torch.core.tools.bench import run_bench
    from llm_torch.core.tools.bench_results import BenchSpec

    spec = BenchSpec(prompt_lengths=lengths, new_tokens=new_tokens, repetitions=repetitions, batches=batches,
                     context=model.context)
    prepare = None
    if model.quantize:
        from llm_torch.core.placement.loading import resolve_device
        from llm_torch.quant.api import quantize_loaded
        from llm_torch.quant.spec import make_spec

        qspec = make_spec(model.quantize, cuda=resolve_device(model.device).type == "cuda")
        prepare = lambda loaded: quantize_loaded(loaded, qspec)  # noqa: E731 - timed with the load
    with render.progress("benchmarking", "runs") as update:
        result = run_bench(model.model, spec, dtype=model.dtype, device=model.device, threads=model.threads,
                           progress=lambda done, total, what: update(done, total, what), prepare=prepare,
                           kv_cache=model.kv_cache)
    if output.json:
        render.write_json(result.to_dict())
    elif sys.stdout.isatty():
        _print_rich(result)
    else:
        render.write(plain_report(result))


# ------------------------------------------------------------------------------------------ formatting


def _tests(result) -> list[tuple[str, object]]:
    """(llama-bench style test name, Stat of tokens/s) per test."""
    rows = [(f"pp{p.prompt_tokens}", p.tokens_per_second) for p in result.prefill]
    if result.decode is not None:
        rows.append((f"tg{result.decode.new_tokens}", result.decode.tokens_per_second))
    rows += [(f"tg{b.new_tokens} x{b.batch}", b.tokens_per_second) for b in result.batched]
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _header(result) -> list[tuple[str, str]]:
    from pathlib import Path

    m = result.model
    return [
        ("model", Path(m.name).name if "/" in m.name and Path(m.name).exists() else m.name),  # a path: its last part
        ("dtype", f"{m.quantization} + {m.dtype}" if m.quantization else m.dtype),
        ("size", _mb(m.weights_bytes)),
        ("params", _millions(m.params)),
        ("device", m.device),
        ("threads", str(result.threads)),
    ]


def _notes(result) -> list[str]:
    m = result.model
    notes = []
    load = f"load: {result.load_seconds:.2f} s (load_model in-process)"
    if result.startup_seconds is not None:
        load += f"; process start + imports before it: {result.startup_seconds:.2f} s"
    notes.append(load)
    if result.first_token_seconds is not None:
        notes.append(
            f"first token after load: {result.first_token_seconds:.3f} s "
            f"(cold run, {result.first_token_prompt_tokens}-token prompt, not counted in the table)"
        )
    rss_mib = result.peak_rss_bytes / 2**20
    ratio = result.peak_rss_bytes / m.weights_bytes if m.weights_bytes else 0.0
    notes.append(f"peak RSS: {rss_mib:.0f} MiB ({ratio:.2f}x the weights)")
    bw = result.bandwidth
    if bw is not None:
        notes.append(
            f"memory bandwidth: {bw.read_gb_per_s:.1f} GB/s read (best of the runs; median {bw.read_median_gb_per_s:.1f}), "
            f"{bw.copy_gb_per_s:.1f} GB/s copy, {bw.threads} thread{'s' if bw.threads != 1 else ''}"
        )
        ceiling = result.decode_ceiling_tokens_per_second
        line = f"decode ceiling: {ceiling:.1f} tok/s = bandwidth / {_mb(m.bytes_per_token)} of weights read per token"
        if result.decode_fraction_of_ceiling is not None:
            line += f"; decode reaches {result.decode_fraction_of_ceiling:.0%} of it"
        notes.append(line)
    if "decode_kernels" in result.environment:
        notes.append(f"one-token matrix-vector products: {result.environment['decode_kernels']}")
    if "decode_step" in result.environment:
        notes.append(f"decode step: {result.environment['decode_step']}")
    if "kv_cache" in result.environment:
        notes.append(f"KV cache: {result.environment['kv_cache']}")
    if result.batched:
        per = ", ".join(f"x{b.batch} {b.per_sequence_tokens_per_second.median:.1f}" for b in result.batched)
        notes.append(f"tgN xB: B sequences ({result.batched[0].prompt_tokens}-token prompts) decoding at once, "
                     f"aggregate tok/s; per sequence: {per}")
    spec = result.spec
    notes.append(f"tok/s: median of {spec.repetitions} runs after {spec.warmup} warm-up; min and max alongside")
    if "load_average" in result.environment:
        notes.append(f"load average (1/5/15 min) at start: {result.environment['load_average']}; "
                     f"figures are noisy when it exceeds the free cores ({result.environment.get('cpus_available', '?')} available)")
    return notes


def plain_report(result) -> str:
    """A Markdown table plus notes: plain text for pipes and issue comments."""
    head = _header(result)
    columns = [k for k, _ in head] + ["test", "t/s", "min", "max"]
    rows = [[v for _, v in head] + [name, f"{s.median:.2f}", f"{s.min:.2f}", f"{s.max:.2f}"] for name, s in _tests(result)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    numeric = set(range(len(head) + 1, len(columns)))

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in numeric else "-" * w for i, w in enumerate(widths)) + " |"
    out = [line(columns), sep] + [line(r) for r in rows] + [""] + _notes(result)
    return "\n".join(out) + "\n"


def _print_rich(result) -> None:
    from rich.table import Table

    # The per-model columns of the plain table repeat on every row: on a terminal they go in the title.
    title = " · ".join(f"{k} {v}" if k in ("size", "params", "threads") else v for k, v in _header(result))
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("test", style="bold", no_wrap=True)
    for k in ("t/s (median)", "min", "max"):
        table.add_column(k, justify="right", no_wrap=True)
    for name, s in _tests(result):
        table.add_row(name, f"{s.median:.2f}", f"{s.min:.2f}", f"{s.max:.2f}")
    render.show(table)
    for note in _notes(result):
        render.note(note)
