"""The report card of a quantized model against its float model: size, memory, speed and quality.

Quality is measured on a fixed English text (the start of the standard library's pydoc topics, ~512
tokens): perplexity of each model on it, and the mean KL divergence KL(float || quantized) of the
next-token distributions, position by position. Peak RSS is measured in a fresh process per model
(this process holds both); speeds are medians of interleaved runs in this process.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llm_torch.core.errors import InputError

EVAL_TOKENS = 512
PREFILL_TOKENS = 128
DECODE_TOKENS = 32
REPETITIONS = 3


def eval_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:6000]


@dataclass
class Card:
    name: str
    disk_bytes: int
    weights_bytes: int
    peak_rss_bytes: int | None
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    perplexity: float
    mean_kl: float  # 0 for the float model itself


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_of_load(ref: str, dtype: str) -> int | None:
    """Peak RSS (bytes) of a fresh process that loads the model and runs one token through it."""
    code = (
        "import sys, torch\n"
        "from llm_torch.core.placement.loading import load_model\n"
        "from llm_torch.core.tools.machine import peak_rss_bytes\n"
        "m = load_model(sys.argv[1], dtype=sys.argv[2], with_tokenizer=False).model\n"
        "with torch.inference_mode(): m(torch.tensor([[1]]))\n"
        "print(peak_rss_bytes())\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code, ref, dtype], capture_output=True, text=True, timeout=300)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _log_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))[0].float()
    return torch.log_softmax(logits, dim=-1)  # [T, V]


def _speeds(models: dict[str, torch.nn.Module], vocab: int, prefill_tokens: int,
            step: Callable[[str], None]) -> dict[str, tuple[float, float]]:
    from llm_torch.core.tools.bench import random_prompt, time_decode, time_prefill
    from llm_torch.core.engine.runner import make_runner

    prompt, start = random_prompt(vocab, prefill_tokens), random_prompt(vocab, 1, 1)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    runners = {name: make_runner(model) for name, model in models.items()}
    with torch.inference_mode():
        for rep in range(-1, REPETITIONS):  # one warm-up round, then interleaved repetitions
            for name, runner in runners.items():
                p = time_prefill(runner, prompt).prefill_tokens_per_second
                d = time_decode(runner, start, DECODE_TOKENS).decode_tokens_per_second
                step(f"speed of the {name} model")
                if rep >= 0:
                    runs[name].append((p, d))
    return {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}


def report_card(float_ref: str, quant_dir: Path, *, dtype: str = "float32", rss: bool = True,
                progress: Callable[[int, int, str], None] | None = None) -> list[Card]:
    """[float card, quantized card]. The float model is loaded with `dtype` (the baseline of the targets).

    progress(done, total, what): after each step (loads, scoring, speed runs, memory measurements)."""
    from llm_torch.core.tools.model_size import weights_bytes
    from llm_torch.core.placement.loading import load_model, resolve_model

    total, done = 3 + 2 * (REPETITIONS + 1) + (2 if rss else 0), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    quant_dir = Path(quant_dir)
    base = load_model(float_ref, dtype=dtype)
    step("loaded the float model")
    quant = load_model(str(quant_dir))
    step("loaded the quantized model")
    if quant.config.quantization_config is None:
        raise InputError(f"{quant_dir} is not a quantized model folder", hint="give the folder written by llm quantize")
    from llm_torch.core.engine.spec import context_length

    context = context_length(base.model)
    n = min(EVAL_TOKENS, context)  # a model with a short context (a test's tiny one) is scored on what fits
    ids = base.tokenizer.encode(eval_text())[:n]
    if quant.tokenizer.encode(eval_text())[:n] != ids:
        raise InputError("the quantized folder's tokenizer differs from the float model's", hint="compare a model with its own quantized copy")
    ref = _log_probs(base.model, ids)
    got = _log_probs(quant.model, ids)
    targets = torch.tensor(ids[1:])
    nll = {k: -lp[:-1].gather(1, targets[:, None]).mean().item() for k, lp in (("float", ref), ("quant", got))}
    kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
    step("scored both models")
    speeds = _speeds({"float": base.model, "quant": quant.model}, base.config.vocab_size, min(PREFILL_TOKENS, context - 2),
                     step)
    resolved = resolve_model(float_ref)
    cards = []
    for key, loaded, path, ref_dtype, kl_value in (
        ("float", base, resolved.path, dtype, 0.0),
        ("quant", quant, quant_dir, "auto", kl),
    ):
        peak = peak_rss_of_load(str(path) if key == "quant" else float_ref, ref_dtype) if rss else None
        if rss:
            step(f"peak memory of the {key} model")
        cards.append(Card(
            name=f"{loaded.name} ({ref_dtype})" if key == "float" else str(quant_dir),
            disk_bytes=path_bytes(Path(path)),
            weights_bytes=weights_bytes(loaded.model),
            peak_rss_bytes=peak,
            prefill_tokens_per_second=speeds[key][0],
            decode_tokens_per_second=speeds[key][1],
            perplexity=float(torch.tensor(nll[key]).exp()),
            mean_kl=kl_value,
        ))
    return cards
