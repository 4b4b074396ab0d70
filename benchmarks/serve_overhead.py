"""What the single-client server path adds per token over `llm bench` decode, in one process.

Each repetition runs, alternately:
- bench: `llm bench`'s decode (core/tools/bench.py time_decode: an Engine without a tokenizer, on the main
  thread) of N tokens after the chat prompt's ids;
- serve: the same prompt through `llm serve`'s stack in this process (the engine loop on the main thread as
  `llm serve` runs it, uvicorn on another thread, the same switch interval) and one streaming chat completion
  read by a client in a child process (so the client's own work is not ours); greedy, max_tokens N + 1.

ms/token: bench: decode_seconds / N (first token to last); serve: from the client receiving the first content
chunk to receiving the finish chunk, / (completion tokens - 1); "whole": from sending the request (bench: from
calling time_decode) to the last token, / tokens. Medians over the repetitions, and the median of the
per-repetition differences (each pair ran back to back, so a busy machine hits both alike). On a shared machine
wall times swing by more than the overhead; the steady figure is CPU ms/token from the threads' CPU clocks:
the engine thread's outside runner.forward (scheduling, sampling, detokenizing, handing events over) and the
HTTP thread's (uvicorn, SSE, JSON). Added CPU = serve's engine-thread step CPU - bench's + the HTTP thread's:
on a machine whose cores the model's threads fill, that is what the forward waits for. And the median wall gap
between one forward's return and the next forward's call on the engine thread: what waiting for the GIL adds.

    python benchmarks/serve_overhead.py                 # smollm2, 64 tokens, 7 repetitions
    python benchmarks/serve_overhead.py -n 128 -r 11 --profile serve.prof   # + cProfile of the HTTP thread
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

CLIENT = r"""
import http.client, json, sys, time
port = int(sys.argv[1])
for line in sys.stdin:
    body = json.loads(line)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    first = last = None
    usage = None
    while True:
        raw = r.readline()
        if not raw:
            break
        if not raw.startswith(b"data: "):
            continue
        data = raw[6:].strip()
        if data == b"[DONE]":
            break
        now = time.perf_counter()
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or []:
            if c["delta"].get("content") and first is None:
                first = now
            if c.get("finish_reason"):
                last = now
    conn.close()
    print(json.dumps({"sent": sent, "first": first, "last": last, "tokens": usage["completion_tokens"]}), flush=True)
"""


def thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def bench_once(runner, prompt_ids, n: int) -> dict:
    """`llm bench` decode of n tokens after prompt_ids: ms/token of decode, of the whole run (prefill
    included) and the process's CPU ms/token."""
    from llm_torch.core.tools.bench import time_decode

    c0, f0, g0, t0 = time.thread_time(), FORWARD_CPU[0], len(GAPS), time.perf_counter()
    t = time_decode(runner, prompt_ids, n)
    whole, cpu = time.perf_counter() - t0, time.thread_time() - c0 - (FORWARD_CPU[0] - f0)
    return {"ms": 1e3 * t.decode_seconds / n, "whole": 1e3 * whole / (n + 1), "cpu": 1e3 * cpu / (n + 1),
            "gap": median_gap_ms(g0)}


FORWARD_CPU = [0.0]  # the engine thread's CPU seconds inside runner.forward, so far
GAPS: list[float] = []  # wall seconds from each forward's return to the next forward's call


def median_gap_ms(since: int) -> float:
    """The median of the step gaps after GAPS[since] (the first, a request's start, left out): the engine thread's
    wall time between forwards, which a thread holding the GIL lengthens; a median, so preemption by other
    processes (rare spikes) does not count."""
    return 1e3 * statistics.median(GAPS[since + 1 :])


def time_forward(runner) -> None:
    """Count runner.forward's CPU time apart: what is left on the engine thread is the step's Python (scheduling,
    sampling, detokenizing, handing events over), which the model's compute would otherwise drown."""
    forward = runner.forward
    last = [None]

    def timed(cache, segments):
        c0, t0 = time.thread_time(), time.perf_counter()
        if last[0] is not None:
            GAPS.append(t0 - last[0])
        try:
            return forward(cache, segments)
        finally:
            FORWARD_CPU[0] += time.thread_time() - c0
            last[0] = time.perf_counter()

    runner.forward = timed


def serve_once(loaded, runner, n: int, profile=None) -> dict:
    """One streamed chat completion through a fresh server in this process; the engine loop on this thread."""
    import uvicorn

    from llm_torch.core.engine.engine import Engine, EngineConfig
    from llm_torch.core.serving.engine_thread import EngineThread
    from llm_torch.core.serving.server import ServeSettings, create_app

    engine = EngineThread(Engine(loaded.model, loaded.tokenizer, EngineConfig(max_batch=8), runner=runner))
    app = create_app(engine, loaded.tokenizer, ServeSettings(loaded.name, generation_config=loaded.generation_config))
    sock = socket.create_server(("127.0.0.1", 0))
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(sock.getsockname()[1])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    out: dict = {}

    def http():
        if profile is not None:
            profile.enable()
        try:
            server.run(sockets=[sock])
        finally:
            if profile is not None:
                profile.disable()
            engine.stop()

    def drive():
        try:
            while not server.started:
                time.sleep(0.01)
            body = {"model": loaded.name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": n + 1,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            c0 = {"engine": thread_cpu(main), "http": thread_cpu(web.ident), "forward": FORWARD_CPU[0], "gaps": len(GAPS)}
            client.stdin.write(json.dumps(body) + "\n")
            client.stdin.flush()
            got = json.loads(client.stdout.readline())
            tokens = got["tokens"]
            out["ms"] = 1e3 * (got["last"] - got["first"]) / (tokens - 1)
            out["whole"] = 1e3 * (got["last"] - got["sent"]) / tokens
            out["tokens"] = tokens
            http_cpu, engine_cpu = thread_cpu(web.ident) - c0["http"], thread_cpu(main) - c0["engine"]
            out["cpu_http"] = 1e3 * http_cpu / tokens
            out["gap"] = median_gap_ms(c0["gaps"])
            out["cpu_engine"] = 1e3 * (engine_cpu - (FORWARD_CPU[0] - c0["forward"])) / tokens
        finally:
            server.should_exit = True

    main = threading.get_ident()
    web = threading.Thread(target=http, daemon=True)
    web.start()
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    engine.run()
    web.join()
    driver.join()
    sock.close()
    client.stdin.close()
    client.wait()
    return out


PROMPT = "Count from 1 to 300, separated by commas."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-n", "--new-tokens", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, help="compute threads (default: as `llm bench`); 1 on a busy machine, "
                    "where OpenMP barriers make wall times swing")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the HTTP thread over all serve runs into FILE")
    args = ap.parse_args()

    import cProfile

    from llm_torch.core.engine.runner import make_runner
    from llm_torch.core.openmp import set_threads
    from llm_torch.core.placement.loading import load_model

    set_threads(args.threads)
    loaded = load_model(args.model, progress=False)
    runner = make_runner(loaded.model)
    time_forward(runner)
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt_ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    sys.setswitchinterval(0.0005)  # as `llm serve` sets it
    # CPU time, not wall: the thread spends most of its wall time asleep in epoll.
    profile = cProfile.Profile(time.thread_time) if args.profile else None
    rows = []
    for rep in range(args.repetitions + 1):  # the first pair warms up and is not counted
        s = serve_once(loaded, runner, args.new_tokens, profile if rep else None)
        n = s["tokens"] - 1  # bench the same number of decode steps
        b = bench_once(runner, prompt_ids, n)
        if not rep:
            continue
        r = {"bench": b["ms"], "serve": s["ms"], "added": s["ms"] - b["ms"],
             "bench_whole": b["whole"], "serve_whole": s["whole"], "added_whole": s["whole"] - b["whole"],
             "bench_step_cpu": b["cpu"], "serve_step_cpu": s["cpu_engine"], "http_cpu": s["cpu_http"],
             "added_cpu": s["cpu_engine"] - b["cpu"] + s["cpu_http"],
             "bench_gap": b["gap"], "serve_gap": s["gap"], "added_gap": s["gap"] - b["gap"]}
        rows.append(r)
        print(f"rep {rep} ({s['tokens']} tokens): " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median of {len(rows)} (ms/token): decode: bench {med['bench']:.2f}, serve {med['serve']:.2f}, added "
          f"{med['added']:+.2f}; whole request (prefill included): bench {med['bench_whole']:.2f}, serve "
          f"{med['serve_whole']:.2f}, added {med['added_whole']:+.2f}; CPU outside the forward: engine thread "
          f"{med['bench_step_cpu']:.3f} (bench) {med['serve_step_cpu']:.3f} (serve) + HTTP thread {med['http_cpu']:.3f}: "
          f"added {med['added_cpu']:+.3f}; engine thread's wall time between forwards (median step): bench "
          f"{med['bench_gap']:.3f}, serve {med['serve_gap']:.3f}, added {med['added_gap']:+.3f}; "
          "added = median of the paired differences")
    if profile is not None:
        profile.dump_stats(args.profile)


if __name__ == "__main__":
    main()
