#!/usr/bin/env python
"""The built-in model's first impression: five simple questions, asked as `llm generate --chat` asks them
(the model's chat template, its default system prompt), at three seeds, with the sampling a user gets
without flags (the model's generation_config, else llm's defaults) or the flags given here.

    python benchmarks/first_answers.py                              # the defaults in effect
    python benchmarks/first_answers.py --temperature 0.2 --top-p 0.9  # a candidate setting
    python benchmarks/first_answers.py -m ./other-model --seeds 1 2 3 4 5 --json answers.json

benchmarks/first_answers.md has the runs that chose the built-in model's settings, judged.

Not a test: the answers go to stdout for a person to read and judge (a small model's right answer has
too many forms for a string check). The model is loaded once; each answer is one seeded request, the
same tokens as `llm generate --chat QUESTION --seed S` with the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from llm_torch.core.openmp import tune_openmp

tune_openmp()  # the CLI's OpenMP setting, before anything imports torch

QUESTIONS = (
    "What is 2+2?",
    "Write a haiku about the sea.",
    "How do you say 'good morning' in French?",
    "Name three colours.",
    "What is the capital of France?",
)
SEEDS = (1, 2, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="model reference (default: the built-in smollm2)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    for flag in ("temperature", "top-p", "min-p", "repetition-penalty"):
        p.add_argument(f"--{flag}", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--json", metavar="FILE", help="also write the answers and the settings as JSON")
    args = p.parse_args(argv)

    from llm_torch.core.engine.engine import generate
    from llm_torch.core.engine.events import GenerationSpec
    from llm_torch.core.engine.sampling_spec import sampling_spec
    from llm_torch.core.placement.loading import load_model

    loaded = load_model(args.model)
    tok = loaded.tokenizer
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                 repetition_penalty=args.repetition_penalty)
    base = sampling_spec(loaded.generation_config, **given)
    print(f"# {loaded.name}: temperature {base.temperature}, top_k {base.top_k}, top_p {base.top_p}, "
          f"min_p {base.min_p}, repetition_penalty {base.repetition_penalty}, -n {args.max_new_tokens}")
    rows = []
    t0 = time.perf_counter()
    for question in QUESTIONS:
        rendered = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = tok.encode(rendered, add_special_tokens=False)  # the template holds the specials (as --chat)
        for seed in args.seeds:
            spec = GenerationSpec(max_new_tokens=args.max_new_tokens,
                                  sampling=sampling_spec(loaded.generation_config, **given, seed=seed))
            result = generate(loaded.model, tok, ids, spec)
            rows.append({"question": question, "seed": seed, "answer": result.text,
                         "tokens": len(result.token_ids), "finish_reason": result.finish_reason})
            print(f"\n## {question} (seed {seed}, {len(result.token_ids)} tokens, {result.finish_reason})\n"
                  f"{result.text.strip()}", flush=True)
    print(f"\n# {len(rows)} answers in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        settings = {k: getattr(base, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": loaded.name, "settings": settings, "max_new_tokens": args.max_new_tokens,
                       "answers": rows}, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
