#!/usr/bin/env python3
"""What a request's start and end cost the streams already running, measured and simulated.

One long stream (one request, --stream-tokens output tokens) runs while short requests arrive
beside it (Poisson, --rate, --inject-tokens output tokens each). Each gap of the long stream is
classed by what an injected request did in the step that ended it: its first token (`start`: the
router's admission, the prefix lookup, its prompt rows), a token of its decoding (`decode`), its
last token (`end`), or nothing, but it ended the step before (`after end`: the router closing its
stream, the worker freeing and publishing its blocks). A class's cost is the gap's excess over the
median of the nearby gaps (six each side) in which no injected request did anything: a local
comparison, so the machine's drift over seconds (tens of percent here) cancels, where totals of
runs apart do not.

The same trace (the long stream and the injected requests at their measured arrival times) runs
through the capacity planner's simulator (`moemesh plan --traffic trace:...`) on a profile
calibrated against the same cluster, and is classed the same way: what the simulator lacks per
class (docs/planner.md, "Open points"). Both are classed by `moemesh plan gaps`, the code with
which `moemesh plan profile --calibrate-url` runs the same measurement and fits the start's cost
on it (profile `step.start_s`, core/planner_measure.h).

  bench/request_cost.py --moemesh build/services/cli/moemesh --model /tmp/tiny [--config 1/1/1/1]
"""
import argparse, json, os, signal, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from planner_validate import wait_ready  # noqa: E402

CLASSES = ["start", "decode", "end", "after_end"]


def gaps(a, stream_file, beside_file=None, trace_out=None):
    """`moemesh plan gaps`: the stream's gaps classed and priced (the same code `plan profile` fits
    the start's cost with); the beside client's clock is matched to the stream's."""
    cmd = [a.moemesh, "plan", "gaps", "--stream", stream_file, "--json"]
    if beside_file:
        cmd += ["--beside", beside_file]
    if trace_out:
        cmd += ["--trace-out", trace_out]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def bench(a, port, args, path):
    subprocess.run([a.moemesh, "bench", "--url", f"http://127.0.0.1:{port}", "--vocab", "250", "--per-request", path]
                   + args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", default="1/1/1/1", help="attention/experts/replicas/micro-batches of moemesh up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=15, help="injected requests per second")
    ap.add_argument("--inject", type=int, default=30, help="injected requests per round")
    ap.add_argument("--inject-tokens", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=2000)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--profile", help="simulate on this profile (default: calibrate one on the cluster)")
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--out-dir", help="keep the per-request files and traces here")
    a = ap.parse_args()
    att, exp, rep, mb = a.config.split("/")
    out = a.out_dir or tempfile.mkdtemp(prefix="request-cost-")
    os.makedirs(out, exist_ok=True)
    up = subprocess.Popen([a.moemesh, "up", "--model", a.model, "--attention", att, "--experts", exp, "--replicas", rep,
                           "--micro-batches", mb, "--port", str(a.port), "--cores", str(a.cores),
                           "--control-port", str(a.port + 10), "--admin-port", str(a.port + 20)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    measured = {c: [] for c in CLASSES}
    traces = []
    try:
        wait_ready(f"http://127.0.0.1:{a.port}", up)
        bench(a, a.port, ["--concurrency", "4", "--requests", "32", "--prompt-len", "32", "--output-len", "16"],
              os.path.join(out, "warm.jsonl"))
        prof = a.profile or os.path.join(out, "profile.json")
        if not a.profile:
            subprocess.run([a.moemesh, "plan", "profile", "--model", a.model, "--out", prof, "--calibrate-url",
                            f"http://127.0.0.1:{a.port}", "--cores", str(a.cores), "--calibrate-repeats", "1",
                            "--calibrate-attention", att, "--calibrate-experts", exp, "--calibrate-replicas", rep,
                            "--calibrate-micro-batches", mb], check=True, stdout=subprocess.DEVNULL)
        for r in range(a.rounds):
            # The long stream in the background, the injected requests beside it (fresh prompts
            # each round: every start misses the prefix cache, as the simulator assumes).
            stream_file = os.path.join(out, f"stream{r}.jsonl")
            bg = subprocess.Popen([a.moemesh, "bench", "--url", f"http://127.0.0.1:{a.port}", "--vocab", "250",
                                   "--concurrency", "1", "--requests", "1", "--prompt-len", str(a.prompt_len),
                                   "--output-len", str(a.stream_tokens), "--seed", str(1000 + r), "--per-request",
                                   stream_file], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)  # the stream is running before the first injected request: all fall beside it
            bench(a, a.port, ["--rate", str(a.rate), "--requests", str(a.inject), "--prompt-len",
                                    str(a.prompt_len), "--output-len", str(a.inject_tokens), "--seed", str(2000 + r)],
                        os.path.join(out, f"inject{r}.jsonl"))
            if bg.wait() != 0:
                raise RuntimeError("the long stream's bench failed")
            g = gaps(a, stream_file, os.path.join(out, f"inject{r}.jsonl"), os.path.join(out, f"trace{r}.csv"))
            print(f"round {r}: {g['matched']} of {g['others']} injected first tokens aligned at "
                  f"+{g['offset_s'] * 1e3:.2f} ms", file=sys.stderr)
            if g["matched"] < 0.8 * g["others"]:  # the clocks were not matched: its classes would be noise
                print(f"round {r}: skipped (fewer than 80% aligned)", file=sys.stderr)
                continue
            for c in CLASSES:
                measured[c] += [x * 1e3 for x in g["excess_s"][c]]
            traces.append(os.path.join(out, f"trace{r}.csv"))
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait()
    simulated = {c: [] for c in CLASSES}
    for r, csv in enumerate(traces):
        sim = os.path.join(out, f"sim{r}.jsonl")
        subprocess.run([a.moemesh, "plan", "--profile", prof, "--attention", att, "--experts", exp, "--replicas", rep,
                        "--micro-batches", mb, "--traffic", f"trace:{csv}", "--layers-per-event", "1", "--seed", str(r),
                        "--per-request", sim], check=True, stdout=subprocess.DEVNULL)
        for c, v in gaps(a, sim)["excess_s"].items():
            simulated[c] += [x * 1e3 for x in v]
    print(f"\n{a.config}, {a.rounds} rounds of {a.inject} requests of {a.inject_tokens} tokens at {a.rate}/s beside "
          f"a stream of {a.stream_tokens}; excess of a gap over its neighbours, median ms (gaps):")
    print("| class | measured | simulated | simulator lacks |")
    print("| --- | ---: | ---: | ---: |")
    for c in CLASSES:
        m, s = measured[c], simulated[c]
        fm = statistics.median(m) if m else float("nan")
        fs = statistics.median(s) if s else float("nan")
        print(f"| {c} | {fm:+.2f} ({len(m)}) | {fs:+.2f} ({len(s)}) | {fm - fs:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
