#!/usr/bin/env python3
"""Two builds (or two sets of `moemesh up` flags) served side by side and loaded in turn: each
round runs every traffic against A, then against B, so the machine's drift falls on both alike.
Prints the medians over rounds and B/A.

  bench/serve_ab.py --a OLD/moemesh --b build/services/cli/moemesh --model /tmp/tiny
  bench/serve_ab.py --a build/services/cli/moemesh --b-flags=--no-kvstore --model /tmp/tiny

Both clusters are up for the whole run; the one not loaded sits idle. With --fresh, one cluster
is up at a time instead: each round starts A, warms it up, runs every traffic, stops it, then the
same with B (nothing idle beside the one measured, and each round a fresh cluster). Every run has
prompts of its own (a seed per round and traffic), so none comes from a prefix cache an earlier run
filled.
"""
import argparse, json, os, shlex, signal, subprocess, sys, tempfile

from planner_validate import bench_metrics, median, wait_ready

KEYS = ["tok_s", "ttft_p50", "ttft_p90", "itl_p50", "itl_p90"]


def start(moemesh, model, port, flags, cores):
    cmd = [moemesh, "up", "--model", model, "--port", str(port), "--control-port", str(port + 10),
           "--admin-port", str(port + 20), "--cores", str(cores)] + flags
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="moemesh binary A (the baseline)")
    ap.add_argument("--b", help="moemesh binary B (default: A)")
    ap.add_argument("--a-flags", default="", help="extra `moemesh up` flags for A")
    ap.add_argument("--b-flags", default="", help="extra `moemesh up` flags for B")
    ap.add_argument("--model", required=True)
    ap.add_argument("--up-flags", default="--attention 1 --experts 1 --micro-batches 2", help="for both")
    ap.add_argument("--traffic", default="closed:1,closed:16,poisson:20", help="closed:N / poisson:RATE, comma-separated")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="uniform:16:64")
    ap.add_argument("--output-len", default="32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--fresh", action="store_true", help="one cluster up at a time, started afresh each round")
    a = ap.parse_args()
    sides = {"A": (a.a, a.a_flags), "B": (a.b or a.a, a.b_flags)}
    tmp = tempfile.mkdtemp(prefix="serve-ab-")
    procs, urls = {}, {}
    traffic = a.traffic.split(",")
    got = {(name, t): [] for name in sides for t in traffic}

    def up(names):
        for name in names:
            binary, flags = sides[name]
            port = a.port + 100 * list(sides).index(name)
            procs[name] = start(binary, a.model, port, shlex.split(a.up_flags) + shlex.split(flags), a.cores)
            urls[name] = f"http://127.0.0.1:{port}"
        for name in names:
            wait_ready(urls[name], procs[name])

    def down():
        for p in procs.values():
            os.killpg(p.pid, signal.SIGINT)
        for p in procs.values():
            p.wait(timeout=60)
        procs.clear()

    def run(name, r, i, t):
        # A seed per round and traffic: fresh prompts every run, none restored from a prefix
        # cache an earlier run filled (both sides get the same ones).
        seed = r * len(traffic) + i
        kind, value = t.split(":")
        load = ["--concurrency", value] if kind == "closed" else ["--rate", value]
        requests = max(a.requests, 4 * int(value)) if kind == "closed" else a.requests
        out = os.path.join(tmp, f"{name}-{t.replace(':', '')}-{r}.json")
        subprocess.run([sides[name][0], "bench", "--url", urls[name], "--requests", str(requests), "--seed", str(seed),
                        "--prompt-len", a.prompt_len, "--output-len", a.output_len, "--json", out] + load, check=True,
                       stdout=subprocess.DEVNULL)
        got[(name, t)].append(bench_metrics(out))

    try:
        if not a.fresh:
            up(list(sides))
        for r in range(a.rounds):
            if a.fresh:
                for name in sides:
                    up([name])
                    # A fresh cluster's first requests pay for its warm-up: not measured.
                    subprocess.run([sides[name][0], "bench", "--url", urls[name], "--requests", "16", "--seed",
                                    "999", "--output-len", "8", "--concurrency", "1"], check=True, stdout=subprocess.DEVNULL)
                    for i, t in enumerate(traffic):
                        run(name, r, i, t)
                    down()
            else:
                for i, t in enumerate(traffic):
                    for name in sides:
                        run(name, r, i, t)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        how = "one cluster up at a time, fresh each round" if a.fresh else "both clusters up throughout"
        print(f"medians of {a.rounds} rounds ({how}); A = {a.a} {a.a_flags}, B = {a.b or a.a} {a.b_flags}")
        print("| traffic | " + " | ".join(f"{k} A | B | B/A" for k in KEYS) + " |")
        print("| --- |" + " ---: |" * (3 * len(KEYS)))
        for t in traffic:
            cells = []
            for k in KEYS:
                va, vb = (median([m[k] for m in got[(n, t)]]) for n in sides)
                cells += [f"{va:.2f}", f"{vb:.2f}", f"{vb / va:.2f}"]
            print(f"| {t} | " + " | ".join(cells) + " |")
    finally:
        down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
