#!/usr/bin/env python3
"""Static vs load-driven (EPLB) expert placement under skewed routing, in one run.

  bench/eplb_bench.py --moemesh build/services/cli/moemesh [--model DIR] [--experts 4]
                      [--concurrency 16] [--warm-s 20] [--measure-s 30] [--bias 0=6,4=5]
                      [--micro-batches 1|2] [--rounds N]

The attention workers' --router-bias sends almost every token to two experts that round-robin
placement puts on the same expert host (experts 0 and 4 of 8 over 4 hosts). The same cluster
shape runs twice: placement as cut (static), and with --rebalance-interval-s (the coordinator
re-places experts live from the measured load during the warm-up). Each run: warm-up load, then
`moemesh bench` at a fixed concurrency for --measure-s. Printed per run: output tokens/s, the
expert hosts' imbalance (busiest host's rows / mean rows over the measured window, from
`moemesh status`), re-placements done; and the ratios load-driven/static. With --rounds N the
two alternate N times (static, load-driven, static, ...) and each pair's ratio is printed with
their median: the machine's drift then falls on both sides alike.
"""
import argparse, json, os, signal, statistics, subprocess, sys, tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import free_port  # noqa: E402


def host_rows(cli, control):
    st = json.loads(subprocess.run([cli, "status", "--router", f"tcp://127.0.0.1:{control}", "--json"], check=True,
                                   capture_output=True, text=True).stdout)
    rows = {s["instance"]: float(s.get("rowsTotal", 0)) for s in st["services"] if s["role"] == "EXPERT"}
    return rows, int(st.get("rebalances", 0)), int(st.get("placementMoves", 0))


def bench(cli, port, concurrency, seconds, out):
    subprocess.run([cli, "bench", "--url", f"http://127.0.0.1:{port}", "--concurrency", str(concurrency),
                    "--duration-s", str(seconds), "--prompt-len", "32", "--output-len", "64", "--vocab", "1000",
                    "--json", out], check=True, stdout=subprocess.DEVNULL)
    r = json.load(open(out))
    r = r.get("overall", r)
    return float(r["output_tokens_per_s"]), r


def run(a, model, tmp, label, rebalance):
    port, control = free_port(), free_port()
    argv = [a.moemesh, "up", "--model", model, "--port", str(port), "--control-port", str(control), "--admin-port",
            str(free_port()), "--attention", "1", "--experts", str(a.experts), "--cores", "1", "--no-kvstore",
            "--router-bias", a.bias, "--micro-batches", str(a.micro_batches),
            "--log-dir", os.path.join(tmp, f"logs-{label}")]
    if rebalance:
        argv += ["--rebalance-interval-s", "2"]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in up.stdout:
            if "cluster ready" in line:
                break
        else:
            sys.exit(f"{label}: the cluster did not start")
        bench(a.moemesh, port, a.concurrency, a.warm_s, os.path.join(tmp, f"warm-{label}.json"))
        rows0, _, _ = host_rows(a.moemesh, control)
        tps, _ = bench(a.moemesh, port, a.concurrency, a.measure_s, os.path.join(tmp, f"bench-{label}.json"))
        rows1, rebalances, moves = host_rows(a.moemesh, control)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    delta = [rows1[k] - rows0.get(k, 0) for k in rows1]
    imbalance = max(delta) / (sum(delta) / len(delta)) if sum(delta) > 0 else float("nan")
    print(f"{label:14s} output {tps:8.1f} tokens/s   host imbalance (max/mean rows) {imbalance:5.2f}   "
          f"re-placements {rebalances} ({moves} moves)   rows per host {[int(d) for d in delta]}", flush=True)
    return tps, imbalance


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--warm-s", type=int, default=20)
    ap.add_argument("--measure-s", type=int, default=30)
    ap.add_argument("--bias", default="0=6,4=5")
    ap.add_argument("--micro-batches", type=int, default=2,
                    help="1: the attention worker waits for every layer's experts, so a host's serial work is "
                         "the step's; 2: halves overlap, the worker computes while the hosts do")
    ap.add_argument("--rounds", type=int, default=1, help="static and load-driven runs, alternating")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moemesh-eplb-")
    model = a.model
    if not model:
        model = os.path.join(tmp, "small")
        subprocess.run([a.moemesh, "mkmodel", "--arch", "mixtral", "--preset", "small", "--seed", "1", "--out", model,
                        "--dtype", "f32"], check=True, stdout=subprocess.DEVNULL)
    ratios = []
    for r in range(a.rounds):
        s_tps, s_imb = run(a, model, tmp, f"static-{r}", False)
        e_tps, e_imb = run(a, model, tmp, f"load-driven-{r}", True)
        ratios.append(e_tps / s_tps)
        print(f"round {r}: load-driven / static: throughput x{ratios[-1]:.2f}, imbalance {s_imb:.2f} -> {e_imb:.2f}",
              flush=True)
    if a.rounds > 1:
        print(f"throughput ratio over {a.rounds} rounds: median x{statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
