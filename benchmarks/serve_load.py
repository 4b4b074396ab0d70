"""Load test for OpenAI-compatible servers: `llm serve` and, where installed, llama.cpp's (llama-cpp-python[server]).

N concurrent clients (default 1, 4, 8, 16) each send R streamed chat requests one after another, each with
its own short prompt. Per level: aggregate completion tokens/s (all tokens / wall time of the level), time to
first token p50/p95 and inter-token latency p50/p95 (client side, from the SSE chunks). Then a two-turn chat
(a long system prompt, an answer, the history re-sent with a new question): time to first token of the second
turn with the server's prefix reuse and, with --compare-no-reuse, on a server started without it.

    python benchmarks/serve_load.py                          # starts `llm serve smollm2` on a free port
    python benchmarks/serve_load.py --llama-cpp model.gguf   # also llama_cpp.server on the same GGUF
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1   # a server already running

Not a test: figures go to stdout as a Markdown table (and --json FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SYSTEM = ("You are a meticulous assistant. " * 40).strip()  # ~240 tokens: what prefix reuse saves


def prompts(n: int, salt: int) -> list[str]:
    topics = ["the sea", "a cat", "the moon", "coffee", "a library", "winter", "a robot", "the city", "a garden",
              "music", "rain", "a train", "mountains", "bread", "a lighthouse", "the desert"]
    return [f"Write two sentences about {topics[(i + salt) % len(topics)]} (note {salt}-{i})." for i in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, messages: list, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, usage, text = [], None, []
    async with client.stream("POST", url + "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": tokens, "text": "".join(text), "cached": ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


async def level(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(w: int):
            out = []
            for r, p in enumerate(prompts(per_client, salt=w * 31 + clients)):
                out.append(await one_request(client, url, model, [{"role": "user", "content": p}], max_tokens))
            return out

        await one_request(client, url, model, [{"role": "user", "content": "warm up"}], 4)
        t0 = time.perf_counter()
        results = [x for ws in await asyncio.gather(*(worker(w) for w in range(clients))) for x in ws]
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50": round(pct(ttft, 0.5), 4), "ttft_p95": round(pct(ttft, 0.95), 4),
            "itl_p50": round(pct(itl, 0.5), 4), "itl_p95": round(pct(itl, 0.95), 4)}


async def second_turn(url: str, model: str, max_tokens: int, salt: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Name a colour ({salt})."}]
        a = await one_request(client, url, model, first, max_tokens)
        history = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": "And another one?"}]
        b = await one_request(client, url, model, history, max_tokens)
    return {"turn1_ttft": a["ttft"], "turn2_ttft": b["ttft"], "turn2_cached_tokens": b["cached"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    def __init__(self, argv: list[str], ready: str, url_of=None, timeout: float = 300):
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        self.url = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {self.proc.returncode}")
            if ready in line:
                self.url = url_of(line) if url_of else None
                break

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_ours(model: str, max_batch: int, reuse: bool = True) -> Process:
    llm = shutil.which("llm") or "llm"
    argv = [llm, "serve", model, "--port", "0", "--max-batch", str(max_batch)] + ([] if reuse else ["--no-prefix-reuse"])
    return Process(argv, "serving ", lambda line: re.search(r"at (http://\S+/v1)", line).group(1))


def start_llama_cpp(gguf: str, parallel: int) -> Process:
    port = free_port()
    # interrupt_requests False: by default a new request cuts the one in progress short (its answer ends
    # early with 200), which would count as fast, empty answers; this way they wait their turn.
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_threads", "2",
            "--n_ctx", "8192", "--interrupt_requests", "False"]
    p = Process(argv, "Uvicorn running", None)
    p.url = f"http://127.0.0.1:{port}/v1"
    return p


def model_of(url: str) -> str:
    return httpx.get(url + "/models", timeout=30).json()["data"][0]["id"]


def run_all(url: str, label: str, args) -> list[dict]:
    model = model_of(url)
    rows = []
    for n in args.clients:
        row = asyncio.run(level(url, model, n, args.requests_per_client, args.max_tokens))
        row["server"] = label
        rows.append(row)
        print(f"{label}: {n} clients: {row['tokens_per_s']} tok/s, TTFT p50 {row['ttft_p50']} s p95 {row['ttft_p95']} s, "
              f"ITL p50 {row['itl_p50']} s p95 {row['itl_p95']} s", file=sys.stderr)
    turns = [asyncio.run(second_turn(url, model, args.max_tokens, salt)) for salt in range(3)]
    rows.append({"server": label, "turns": turns,
                 "turn2_ttft_median": round(statistics.median(t["turn2_ttft"] for t in turns), 4),
                 "turn1_ttft_median": round(statistics.median(t["turn1_ttft"] for t in turns), 4)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| server | clients | requests | tokens | tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "clients" in r:
            out.append(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']} | "
                       f"{r['ttft_p50']} | {r['ttft_p95']} | {r['itl_p50']} | {r['itl_p95']} |")
    out.append("")
    for r in rows:
        if "turns" in r:
            cached = [t["turn2_cached_tokens"] for t in r["turns"]]
            out.append(f"{r['server']}: second chat turn TTFT median {r['turn2_ttft_median']} s "
                       f"(first turn {r['turn1_ttft_median']} s; cached prompt tokens {cached})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server's /v1 base (skips starting ours)")
    ap.add_argument("--model", default="smollm2", help="what `llm serve` serves")
    ap.add_argument("--clients", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-cpp", metavar="GGUF", help="also start llama_cpp.server on this GGUF and load it the same way")
    ap.add_argument("--compare-no-reuse", action="store_true", help="also measure the second turn without prefix reuse")
    ap.add_argument("--json", type=Path, help="write all figures here too")
    ap.add_argument("--skip-ours", action="store_true", help="with --llama-cpp: measure only llama.cpp's server")
    args = ap.parse_args()
    rows: list[dict] = []
    if args.url:
        rows += run_all(args.url.rstrip("/"), "given server", args)
    elif not args.skip_ours:
        ours = start_ours(args.model, max(args.clients))
        try:
            rows += run_all(ours.url, "llm serve", args)
        finally:
            ours.stop()
        if args.compare_no_reuse:
            plain = start_ours(args.model, max(args.clients), reuse=False)
            try:
                model = model_of(plain.url)
                turns = [asyncio.run(second_turn(plain.url, model, args.max_tokens, s)) for s in range(3)]
                rows.append({"server": "llm serve --no-prefix-reuse", "turns": turns,
                             "turn2_ttft_median": round(statistics.median(t["turn2_ttft"] for t in turns), 4),
                             "turn1_ttft_median": round(statistics.median(t["turn1_ttft"] for t in turns), 4)})
            finally:
                plain.stop()
    if args.llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: skipping llama.cpp's server", file=sys.stderr)
        else:
            peer = start_llama_cpp(args.llama_cpp, max(args.clients))
            try:
                rows += run_all(peer.url, f"llama_cpp.server {llama_cpp.__version__}", args)
            finally:
                peer.stop()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
