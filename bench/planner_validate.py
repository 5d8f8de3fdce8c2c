#!/usr/bin/env python3
"""The capacity planner against reality on this machine (issue #18's acceptance).

For each configuration of `moemesh up` (attention workers, expert hosts, replicas, micro-batches)
it starts the cluster, measures a profile in the same run (`moemesh plan profile`, calibrated on
this cluster at concurrency 1), then for each traffic runs `moemesh bench --json` and
`moemesh plan --json` with the same shape, lengths and traffic, and prints predicted vs measured
throughput and p50/p90 TTFT and ITL with the relative error.

  bench/planner_validate.py --moemesh build/services/cli/moemesh --model /tmp/tiny [--quick]
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time, urllib.request

CONFIGS = [  # (attention, experts, replicas, micro_batches)
    (1, 1, 1, 2), (1, 2, 1, 2), (2, 2, 1, 2), (2, 2, 2, 2), (1, 2, 1, 1), (2, 4, 2, 1),
]
TRAFFIC = [  # (bench flags, plan --traffic)
    (["--concurrency", "1"], "closed:1"),
    (["--concurrency", "16"], "closed:16"),
    (["--concurrency", "64"], "closed:64"),
    (["--rate", "20"], "poisson:20"),
]


def wait_ready(url, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("moemesh up exited")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("cluster not ready")


def err(pred, meas):
    return (pred - meas) / meas * 100 if meas else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="uniform:16:64")
    ap.add_argument("--output-len", default="32")
    ap.add_argument("--quick", action="store_true", help="2 configurations x 2 traffics")
    ap.add_argument("--port", type=int, default=18000)
    a = ap.parse_args()
    configs, traffic = (CONFIGS[:2], TRAFFIC[:2]) if a.quick else (CONFIGS, TRAFFIC)
    tmp = tempfile.mkdtemp(prefix="planner-validate-")
    rows = []
    for (att, exp, rep, mb) in configs:
        port = a.port
        up = subprocess.Popen([a.moemesh, "up", "--model", a.model, "--attention", str(att), "--experts", str(exp),
                               "--replicas", str(rep), "--micro-batches", str(mb), "--port", str(port),
                               "--control-port", str(port + 10), "--admin-port", str(port + 20)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, up)
            prof = os.path.join(tmp, f"profile-{att}-{exp}-{rep}-{mb}.json")
            subprocess.run([a.moemesh, "plan", "profile", "--model", a.model, "--out", prof, "--calibrate-url", url,
                            "--calibrate-attention", str(att), "--calibrate-experts", str(exp),
                            "--calibrate-micro-batches", str(mb)], check=True, stdout=subprocess.DEVNULL)
            for bench_flags, plan_traffic in traffic:
                bj, pj = os.path.join(tmp, "bench.json"), os.path.join(tmp, "plan.json")
                subprocess.run([a.moemesh, "bench", "--url", url, "--requests", str(a.requests), "--prompt-len",
                                a.prompt_len, "--output-len", a.output_len, "--vocab", "250", "--json", bj] + bench_flags,
                               check=True, stdout=subprocess.DEVNULL)
                subprocess.run([a.moemesh, "plan", "--profile", prof, "--attention", str(att), "--experts", str(exp),
                                "--replicas", str(rep), "--micro-batches", str(mb), "--traffic", plan_traffic,
                                "--requests", str(a.requests), "--prompt-len", a.prompt_len, "--output-len",
                                a.output_len, "--layers-per-event", "1", "--json", pj],
                               check=True, stdout=subprocess.DEVNULL)
                b, p = json.load(open(bj)), json.load(open(pj))
                row = {"config": f"{att}a/{exp}e/r{rep}/mb{mb}", "traffic": plan_traffic,
                       "tok_s": (p["output_tokens_per_s"], b["output_tokens_per_s"])}
                for k in ("ttft_ms", "itl_ms"):
                    for q in ("p50", "p90"):
                        row[f"{k[:-3]}_{q}"] = (p[k][f"{q}_ms"], b[k][q])
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            os.killpg(up.pid, signal.SIGINT)
            up.wait(timeout=60)
    keys = ["tok_s", "ttft_p50", "ttft_p90", "itl_p50", "itl_p90"]
    print("\n| config | traffic | " + " | ".join(f"{k} pred / meas (err)" for k in keys) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in keys) + " |")
    worst = 0
    for r in rows:
        cells = []
        for k in keys:
            pr, me = r[k]
            e = err(pr, me)
            worst = max(worst, abs(e))
            cells.append(f"{pr:.1f} / {me:.1f} ({e:+.0f}%)")
        print(f"| {r['config']} | {r['traffic']} | " + " | ".join(cells) + " |")
    print(f"\nworst error {worst:.0f}% (target 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
