"""Speed measurements behind `llm bench` and benchmarks/compare.py. No printing: results are dataclasses.

What is measured, and how:
- load: wall time of `load_model` in this process (resolve, config, weights, tokenizer);
- prefill at N tokens: the engine (core/engine/engine.py) with a fixed random prompt of N ids and max_new_tokens=1, i.e.
  the time to the first token (forward over the prompt + last-position logits + sampling);
- decode: a 1-token prompt, then `new_tokens` steps through the KV cache (EOS never stops it);
- batched decode at batch B (`batches`): B sequences with different short prompts in one engine, then
  `new_tokens` steps that decode all of them at once; aggregate tokens/s = B x new_tokens / the time of
  those steps, per-sequence tokens/s = new_tokens / that time;
- each measurement runs `warmup` times uncounted, then `repetitions` times, interleaved per repetition
  (pp128, pp512, tg, pp128, ...) so slow drift on a shared machine hits every test alike;
- memory bandwidth: a read-only reduction over a buffer far larger than the last-level cache, with the
  threads the model uses; decode's ceiling is that bandwidth / the weight bytes one token reads.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from .bench_results import BatchResult, BenchResult, BenchSpec, DecodeResult, PrefillResult, Stat
from llm_torch.core.engine.engine import Engine, EngineConfig
from llm_torch.core.errors import InputError
from llm_torch.core.engine.events import Timings
from llm_torch.core.engine.spec import GenerationSpec, context_length
from .machine import environment, measure_memory_bandwidth, peak_rss_bytes, process_age_seconds
from .model_size import model_info
from llm_torch.core.openmp import set_threads
from llm_torch.core.engine.runner import Runner, make_runner
from llm_torch.core.engine.sampling_spec import SamplingSpec

DECODE_PROMPT_TOKENS = 1  # like llama-bench's tg test: decode from an (almost) empty context
BATCH_PROMPT_TOKENS = 16  # each sequence of a batched decode test has its own prompt of this length


def random_prompt(vocab_size: int, length: int, seed: int = 0) -> list[int]:
    """Fixed pseudo-random ids (not the chat template): the same prompt for every run and engine.

    Ids 0..2 are avoided because they are BOS/EOS/PAD in most vocabularies; speed does not depend on them.
    """
    g = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 3 else 0
    return torch.randint(low, vocab_size, (length,), generator=g).tolist()


def _run(runner: Runner, prompt_ids: Sequence[int], max_new_tokens: int, context: int | None) -> Timings:
    # No EOS ids: a benchmark must always run the full count.
    spec = GenerationSpec(max_new_tokens=max_new_tokens, sampling=SamplingSpec(), eos_token_ids=())
    engine = Engine(runner.model, None, EngineConfig(max_batch=1, max_context=context), runner=runner)
    for event in engine.stream(prompt_ids, spec):
        if event.finish_reason:
            return event.timings
    raise AssertionError("stream ended without a final event")


def time_prefill(runner: Runner, prompt_ids: Sequence[int], context: int | None = None) -> Timings:
    """Time to the first token for this prompt (prefill + first sample); context: KV positions (None: the model's)."""
    return _run(runner, prompt_ids, 1, context)


def time_decode(runner: Runner, prompt_ids: Sequence[int], new_tokens: int, context: int | None = None) -> Timings:
    """`new_tokens` decode steps after the prompt (one more token comes out of prefill, uncounted)."""
    timings = _run(runner, prompt_ids, new_tokens + 1, context)
    if timings.completion_tokens != new_tokens + 1:
        raise InputError(
            f"decode stopped after {timings.completion_tokens - 1} of {new_tokens} tokens (context too short)",
            hint="lower --new-tokens",
        )
    return timings


def time_batched_decode(runner: Runner, prompts: Sequence[Sequence[int]], new_tokens: int,
                        context: int | None = None) -> float:
    """Seconds of the `new_tokens` steps that decode every prompt's sequence at once (after all prefills)."""
    spec = GenerationSpec(max_new_tokens=new_tokens + 1, sampling=SamplingSpec(), eos_token_ids=())
    engine = Engine(runner.model, None, EngineConfig(max_batch=len(prompts), max_context=context), runner=runner)
    reqs = [engine.add(p, spec) for p in prompts]
    while not all(r.generated for r in reqs):
        engine.step()
    if any(len(r.generated) != 1 for r in reqs):
        raise AssertionError("the prefills did not end on the same step")
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - t0
    if any(len(r.generated) != new_tokens + 1 for r in reqs):
        raise InputError("batched decode stopped early (context too short)", hint="lower --new-tokens")
    return seconds


def check_fits(model, spec: BenchSpec) -> None:
    context = min(spec.context or context_length(model), context_length(model))
    whose = "the context" if spec.context else "the model's context"
    too_long = [n for n in spec.prompt_lengths if n + 1 > context]
    if too_long:
        raise InputError(
            f"prompt length {max(too_long)} does not fit {whose} of {context} tokens",
            hint=f"use --prompt-lengths below {context}",
        )
    if (BATCH_PROMPT_TOKENS if spec.batches else DECODE_PROMPT_TOKENS) + spec.new_tokens + 1 > context:
        raise InputError(
            f"{spec.new_tokens} new tokens do not fit {whose} of {context} tokens",
            hint=f"use --new-tokens below {context - DECODE_PROMPT_TOKENS - 1}",
        )


# progress(done, total, what): measurement runs finished of all the runs planned, and the one starting now.
Progress = Callable[[int, int, str], None]


def planned_runs(spec: BenchSpec) -> int:
    """Measurement runs bench_loaded makes, warm-ups included."""
    per_round = len(spec.prompt_lengths) + (1 if spec.new_tokens else 0) + len(spec.batches)
    return (spec.warmup + spec.repetitions) * per_round


def bench_loaded(loaded, spec: BenchSpec, *, progress: Progress | None = None
                 ) -> tuple[list[PrefillResult], DecodeResult | None, float | None, list[BatchResult]]:
    """Warm-up then interleaved repetitions on an already loaded model.

    -> (prefill results, decode result, seconds of the first, cold prefill, batched decode results).
    """
    total, done = planned_runs(spec), 0

    def say(what: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, what)
        done += 1

    model = loaded.model
    check_fits(model, spec)
    runner = make_runner(model)
    vocab = model.config.vocab_size
    prompts = {n: random_prompt(vocab, n, spec.seed) for n in spec.prompt_lengths}
    decode_prompt = random_prompt(vocab, DECODE_PROMPT_TOKENS, spec.seed + 1)
    prefill_runs: dict[int, list[Timings]] = {n: [] for n in spec.prompt_lengths}
    decode_runs: list[Timings] = []
    batch_prompts = {b: [random_prompt(vocab, BATCH_PROMPT_TOKENS, spec.seed + 2 + i) for i in range(b)]
                     for b in spec.batches}
    batch_runs: dict[int, list[float]] = {b: [] for b in spec.batches}
    first_token = None
    for rep in range(-spec.warmup, spec.repetitions):
        label = "warm-up" if rep < 0 else f"run {rep + 1}/{spec.repetitions}"
        for n, ids in prompts.items():
            say(f"{label}: prefill {n} tokens")
            t = time_prefill(runner, ids, spec.context)
            if first_token is None:
                first_token = t.prefill_seconds
            if rep >= 0:
                prefill_runs[n].append(t)
        if spec.new_tokens:
            say(f"{label}: decode {spec.new_tokens} tokens")
            t = time_decode(runner, decode_prompt, spec.new_tokens, spec.context)
            if first_token is None:
                first_token = t.prefill_seconds
            if rep >= 0:
                decode_runs.append(t)
        for b, ps in batch_prompts.items():
            say(f"{label}: decode {spec.new_tokens} tokens x batch {b}")
            seconds = time_batched_decode(runner, ps, spec.new_tokens, spec.context)
            if rep >= 0:
                batch_runs[b].append(seconds)
    batched = [
        BatchResult(b, BATCH_PROMPT_TOKENS, spec.new_tokens,
                    Stat.of([b * spec.new_tokens / s for s in runs]), Stat.of([spec.new_tokens / s for s in runs]),
                    Stat.of(runs))
        for b, runs in batch_runs.items()
    ]
    prefill = [
        PrefillResult(
            n,
            Stat.of([t.prefill_tokens_per_second for t in runs]),
            Stat.of([t.prefill_seconds for t in runs]),
        )
        for n, runs in prefill_runs.items()
    ]
    decode = None
    if decode_runs:
        decode = DecodeResult(
            DECODE_PROMPT_TOKENS,
            spec.new_tokens,
            Stat.of([t.decode_tokens_per_second for t in decode_runs]),
            Stat.of([t.decode_seconds for t in decode_runs]),
        )
    return prefill, decode, first_token, batched


def run_bench(
    ref: str | None,
    spec: BenchSpec = BenchSpec(),
    *,
    dtype: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    bandwidth: bool = True,
    progress: Progress | None = None,
    prepare: Callable[[Any], Any] | None = None,
    kv_cache: str = "auto",
) -> BenchResult:
    """Load `ref`, measure load, prefill and decode, then peak RSS and the memory bandwidth.

    prepare(loaded): run after loading and timed with it (the CLI's --quantize); kv_cache: --kv-cache."""
    from llm_torch.core.placement.loading import load_model

    def say(what: str, done: int = 0) -> None:
        if progress is not None:
            progress(done, planned_runs(spec), what)

    used_threads = set_threads(threads)
    startup = process_age_seconds()
    env = environment()  # before the runs: the load average is the machine's, not ours
    say("loading")
    t0 = time.perf_counter()
    # prepare (--quantize) works on float weights: GGUF blocks are then decoded at load
    loaded = load_model(ref, dtype=dtype, device=device, progress=False, context=spec.context, packed=prepare is None,
                        kv_cache=kv_cache)
    if prepare is not None:
        prepare(loaded)
    load_seconds = time.perf_counter() - t0
    info = model_info(loaded)
    env["kv_cache"] = loaded.model.kv_format()
    if info.device == "cpu":
        from llm_torch.core.engine.runner import describe

        env["decode_step"] = describe(loaded.model)
    prefill, decode, first_token, batched = bench_loaded(loaded, spec, progress=progress)
    peak = peak_rss_bytes()  # before the bandwidth buffer exists, so it is the model's peak
    result = BenchResult(
        model=info,
        spec=spec,
        threads=used_threads,
        load_seconds=load_seconds,
        startup_seconds=startup,
        first_token_seconds=first_token,
        first_token_prompt_tokens=spec.prompt_lengths[0] if spec.prompt_lengths else (DECODE_PROMPT_TOKENS if spec.new_tokens else None),
        prefill=prefill,
        decode=decode,
        batched=batched,
        peak_rss_bytes=peak,
        environment=env,
    )
    if bandwidth and info.device == "cpu":
        say("measuring memory bandwidth", planned_runs(spec))
        result.bandwidth = measure_memory_bandwidth()
    return result
