"""Peak RSS and time of `llm convert` on a synthetic multi-shard model (default ~1 GB of bf16 weights).

    python benchmarks/convert_memory.py                 # ~1 GB: HF (4 shards) and Meta (2 shards) sources
    python benchmarks/convert_memory.py --size-gb 0.25 --keep /tmp/convert-bench

Each conversion runs in a fresh interpreter and reports its own VmHWM (peak resident set), so the
model's size can be compared with what streaming one tensor at a time costs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_CHILD = """
import json, sys, time
from pathlib import Path
from llm_torch.core.tools.machine import peak_rss_bytes
from llm_torch.core.tools.convert import ConvertSpec, convert
t0 = time.perf_counter()
r = convert(ConvertSpec(sys.argv[1], Path(sys.argv[2]), **json.loads(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss_bytes(), "bytes": r.bytes_written}))
"""


def synthetic_config(size_gb: float) -> dict:
    """A Llama-shaped config whose bf16 weights take about `size_gb` GB (hidden 2048, 8+ layers)."""
    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16", tie_word_embeddings=False)


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
                       p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_hf(folder: Path, c: dict, shards: int) -> int:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    shapes = list(tensor_shapes(c).items())
    per = math.ceil(len(shapes) / shards)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: (torch.randn(shape, generator=g) * 0.02).bfloat16() for k, shape in shapes[s * per:(s + 1) * per]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * 2 for t in part.values())
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    # A stand-in byte-level vocabulary: GGUF output needs a tokenizer, its content does not matter here.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={f"<t{n}>": n for n in range(c["vocab_size"])}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    return total


def write_meta(folder: Path, c: dict, shards: int) -> int:
    folder.mkdir(parents=True)
    h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    g = torch.Generator().manual_seed(1)
    total = 0
    for r in range(shards):
        def rand(*shape):
            return (torch.randn(shape, generator=g) * 0.02).bfloat16()

        part = {"tok_embeddings.weight": rand(v, h // shards), "norm.weight": torch.ones(h).bfloat16(),
                "output.weight": rand(v // shards, h)}
        for n in range(L):
            p = f"layers.{n}."
            part.update({p + "attention.wq.weight": rand(h // shards, h), p + "attention.wk.weight": rand(h // shards, h),
                         p + "attention.wv.weight": rand(h // shards, h), p + "attention.wo.weight": rand(h, h // shards),
                         p + "feed_forward.w1.weight": rand(i // shards, h), p + "feed_forward.w2.weight": rand(h, i // shards),
                         p + "feed_forward.w3.weight": rand(i // shards, h),
                         p + "attention_norm.weight": torch.ones(h).bfloat16(), p + "ffn_norm.weight": torch.ones(h).bfloat16()})
        torch.save(part, folder / f"consolidated.{r:02d}.pth")
        total += sum(t.numel() * 2 for k, t in part.items() if "norm" not in k or r == 0)
        del part
    # ffn: 2/3 * 4 * 2048 = 5461 -> rounded up to a multiple of 256 = 5632; the multiplier brings it to 5504.
    params = {"dim": h, "n_layers": L, "n_heads": c["num_attention_heads"], "multiple_of": 128,
              "ffn_dim_multiplier": 5504 / 5461, "norm_eps": 1e-5, "vocab_size": v}
    (folder / "params.json").write_text(json.dumps(params))
    return total


def run(source: Path, output: Path, **spec) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(output), json.dumps(spec)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"conversion failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--only", choices=["hf", "meta", "gguf"], action="append")
    args = ap.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    c = synthetic_config(args.size_gb)
    rows = []
    try:
        only = set(args.only or ["hf", "meta", "gguf"])
        if only & {"hf", "gguf"}:
            size = write_hf(work / "hf-src", c, shards=4)
            if "hf" in only:
                rows.append(("HF bf16 (4 shards) -> HF float16", size, run(work / "hf-src", work / "hf-out", dtype="float16",
                                                                           max_shard_size=400_000_000)))
                shutil.rmtree(work / "hf-out")
            if "gguf" in only:
                rows.append(("HF bf16 (4 shards) -> GGUF f16", size, run(work / "hf-src", work / "out.gguf", to="gguf")))
                (work / "out.gguf").unlink()
        if "meta" in only:
            size = write_meta(work / "meta-src", c, shards=2)
            rows.append(("Meta bf16 (2 TP shards) -> HF", size, run(work / "meta-src", work / "meta-out")))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'conversion':36} {'model':>9} {'peak RSS':>9} {'time':>7}")
    for name, size, r in rows:
        print(f"{name:36} {size / 2**20:7.0f} MiB {r['peak_rss'] / 2**20:5.0f} MiB {r['seconds']:6.1f} s")
    return [{"name": n, "model_bytes": s, **r} for n, s, r in rows]


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
