#!/usr/bin/env python
"""What the KV cache format (--kv-cache) costs and buys on the built-in model: decode speed deep into a
context, and quality through the cache.

    python benchmarks/kv_cache.py                      # f32 (the cache before --kv-cache), f16, int8
    python benchmarks/kv_cache.py --depth 4000 -n 32 --formats f32 int8 --threads 2

Speed: decode tokens/s of `-n` tokens after a `--depth`-token random prompt (the engine, as `llm bench`'s
decode test but at depth, where attention reads the whole cache every token); median of `--repetitions`,
formats interleaved.
Quality: the report card's text (quant/report.py eval_text), fed through the cache in chunks of 32 tokens, so
every position attends over keys and values as stored: perplexity per format, and the mean KL divergence of
each format's next-token distributions from f32's and from f16's.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from llm_torch.core.openmp import tune_openmp

tune_openmp()  # the CLI's OpenMP setting, before anything imports torch

CHUNK = 32


def log_probs(model, ids: list[int], kv: str):
    import torch

    model.kv_cache = kv
    cache = model.new_cache(1, len(ids))
    out = []
    with torch.inference_mode():
        for c0 in range(0, len(ids), CHUNK):
            out.append(model(torch.tensor([ids[c0 : c0 + CHUNK]]), cache=cache, slots=[0])[0].float())
    return torch.log_softmax(torch.cat(out), dim=-1)  # [T, V]: row i predicts token i + 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="model reference (default: the built-in smollm2)")
    p.add_argument("--formats", nargs="+", default=["f32", "f16", "int8"])
    p.add_argument("--depth", type=int, default=4000, help="prompt tokens before the timed decode")
    p.add_argument("-n", "--new-tokens", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args(argv)

    import torch

    from llm_torch.core.engine.runner import make_runner
    from llm_torch.core.openmp import set_threads
    from llm_torch.core.placement.loading import load_model
    from llm_torch.core.tools.bench import random_prompt, time_decode
    from llm_torch.quant.report import eval_text

    threads = set_threads(args.threads)
    loaded = load_model(args.model, progress=False)
    model = loaded.model
    print(f"{loaded.name}: {loaded.dtype_name} weights, {threads} threads", flush=True)

    ids = loaded.tokenizer.encode(eval_text() * 4)[: args.eval_tokens]
    lp = {kv: log_probs(model, ids, kv) for kv in args.formats} if not args.skip_quality else {}
    target = torch.tensor(ids[1:])
    for kv in lp:
        nll = -lp[kv][:-1].gather(1, target[:, None]).mean().item()
        kl = {ref: (lp[ref].exp() * (lp[ref] - lp[kv])).sum(-1).mean().item() for ref in ("f32", "f16") if ref in lp}
        kls = ", ".join(f"KL from {ref} {v:.2e}" for ref, v in kl.items() if ref != kv)
        print(f"{kv:>5}: perplexity {torch.tensor(nll).exp().item():.4f} over {len(ids)} tokens" + (f", {kls}" if kls else ""),
              flush=True)

    if args.skip_speed:
        return 0
    prompt = random_prompt(model.config.vocab_size, args.depth)
    speeds: dict[str, list[float]] = {kv: [] for kv in args.formats}
    for _ in range(args.repetitions):
        for kv in args.formats:
            model.kv_cache = kv
            runner = make_runner(model)
            t = time_decode(runner, prompt, args.new_tokens, context=args.depth + args.new_tokens + 2)
            speeds[kv].append(t.decode_tokens_per_second)
            print(f"  run: {kv} {t.decode_tokens_per_second:.2f} tok/s", flush=True)
    for kv in args.formats:
        runs = ", ".join(f"{s:.2f}" for s in speeds[kv])
        print(f"{kv:>5}: decode {statistics.median(speeds[kv]):.2f} tok/s at depth {args.depth} "
              f"({args.new_tokens} tokens; runs {runs}; {make_runner(model).description})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
