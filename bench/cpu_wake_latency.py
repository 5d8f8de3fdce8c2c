#!/usr/bin/env python3
"""A local cluster with its machine's idle cores polling against halting (`moemesh up
--cpu-wake-latency-us 0` against no limit), alternating fresh clusters of one shape round by round
(the machine is shared and its speed drifts, so each pair of runs is minutes apart at most).

Each round starts the cluster one way, warms it up, times the machine's wake-up round trip
(bench_wake_round_trip, when built) and runs each traffic once (`moemesh bench --json`), then the
same the other way with the same seeds (the same requests and arrival times). It prints, per
traffic and metric, the median over the rounds each way and their ratio (polling / halting).
Needs root for the limit (the router warns and runs without it otherwise, and this script stops:
there would be nothing to compare).

  bench/cpu_wake_latency.py --moemesh build/services/cli/moemesh --model /tmp/tiny [--rounds 4]
"""
import argparse, json, os, signal, statistics, subprocess, sys, tempfile, urllib.request

from planner_validate import wait_ready, wake_probe  # same folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "observability"))
from prom_text import parse_metrics, total  # noqa: E402

KEYS = [("tok/s", "output_tokens_per_s", None), ("TTFT p50", "ttft_ms", "p50"), ("TTFT p90", "ttft_ms", "p90"),
        ("ITL p50", "itl_ms", "p50"), ("ITL p90", "itl_ms", "p90")]
MODES = [("halting", None), ("polling", 0)]


def limit_held(admin_url):
    """The router's moemesh_cpu_wake_latency_limit_microseconds, or None where it holds none."""
    name = "moemesh_cpu_wake_latency_limit_microseconds"
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as r:
        fams = parse_metrics(r.read().decode())
    return total(fams, name) if name in fams else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", default="1/1/1/1", help="attention/experts/replicas/micro-batches")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=48, help="per run")
    ap.add_argument("--traffic", default="closed:1,poisson:20,closed:16")
    ap.add_argument("--cores", type=int, default=1, help="moemesh up --cores")
    ap.add_argument("--port", type=int, default=18100)
    probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "bench", "bench_wake_round_trip")
    ap.add_argument("--wake-probe", default=probe if os.path.exists(probe) else None)
    a = ap.parse_args()
    try:
        att, exp, rep, mb = (int(x) for x in a.shape.split("/"))
    except ValueError:
        raise SystemExit(f"--shape {a.shape}: expected attention/experts/replicas/micro-batches, e.g. 1/1/1/1")
    traffic = []
    for spec in a.traffic.split(","):
        kind, _, value = spec.partition(":")
        if kind not in ("closed", "poisson") or not value:
            raise SystemExit(f"--traffic {spec}: closed:N or poisson:RATE")
        traffic.append((spec, ["--concurrency" if kind == "closed" else "--rate", value]))
    tmp = tempfile.mkdtemp(prefix="cpu-wake-latency-")
    url, admin = f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{a.port + 20}"
    runs = {(m, t): [] for m, _ in MODES for t, _ in traffic}
    wakes = {m: [] for m, _ in MODES}
    for r in range(a.rounds):
        for mode, limit in MODES:
            cmd = [a.moemesh, "up", "--model", a.model, "--attention", str(att), "--experts", str(exp),
                   "--replicas", str(rep), "--micro-batches", str(mb), "--cores", str(a.cores), "--port", str(a.port),
                   "--control-port", str(a.port + 10), "--admin-port", str(a.port + 20),
                   "--log-dir", os.path.join(tmp, f"logs-{mode}-{r}")]
            if limit is not None:
                cmd += ["--cpu-wake-latency-us", str(limit)]
            up = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_ready(url, up)
                if limit is not None and limit_held(admin) != limit:
                    raise SystemExit("the router could not hold the limit (it needs root): see its log in " + tmp)
                warm = [a.moemesh, "bench", "--url", url, "--vocab", "250", "--requests", "16", "--concurrency", "1",
                        "--output-len", "8", "--seed", "999"]
                subprocess.run(warm, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if a.wake_probe:
                    wakes[mode].append(wake_probe(a))
                for t, (spec, flags) in enumerate(traffic):
                    seed = r * len(traffic) + t  # both ways the same requests and arrival times
                    bj = os.path.join(tmp, f"bench-{mode}-{spec.replace(':', '')}-{r}.json")
                    subprocess.run([a.moemesh, "bench", "--url", url, "--vocab", "250", "--json", bj, "--seed",
                                    str(seed), "--requests", str(a.requests), "--prompt-len", "uniform:16:64",
                                    "--output-len", "32"] + flags, check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    b = json.load(open(bj))
                    runs[(mode, spec)].append({k: (b[f] if q is None else b[f][q]) for k, f, q in KEYS})
            finally:
                os.killpg(up.pid, signal.SIGINT)
                up.wait(timeout=60)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    med = statistics.median
    print(f"shape {a.shape}, {a.rounds} rounds, {a.requests} requests a run (medians; runs in {tmp})")
    if a.wake_probe:
        print("wake-up round trip p50 (µs): " + ", ".join(f"{m} {med(wakes[m]):.1f}" for m, _ in MODES))
    print("| traffic | metric | halting | polling | polling / halting |")
    print("| --- | --- | ---: | ---: | ---: |")
    for spec, _ in traffic:
        for k, _, _ in KEYS:
            h = med([x[k] for x in runs[("halting", spec)]])
            p = med([x[k] for x in runs[("polling", spec)]])
            spread = lambda m: f"{min(x[k] for x in runs[(m, spec)]):.4g}-{max(x[k] for x in runs[(m, spec)]):.4g}"
            print(f"| {spec} | {k} | {h:.4g} ({spread('halting')}) | {p:.4g} ({spread('polling')}) | {p / h:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
