#!/usr/bin/env python3
"""The capacity planner against reality on this machine (issue #18's acceptance).

For each configuration of `moemesh up` (attention workers, expert hosts, replicas, micro-batches)
it starts the cluster and measures a profile in the same run (`moemesh plan profile`: the engine,
ZeroMQ, and the cluster's own costs calibrated on this cluster with fixed-length requests at
concurrency 1 and 48, and a stream with short requests beside it). Then, --repeats rounds: each
round runs the calibration's requests again and every traffic once (`moemesh bench --json`). The
cluster's speed drifts with the machine's wake-up latency (regimes lasting seconds,
docs/planner.md), so each round's runs are predicted by a profile fitted on that round's own
calibration runs (`plan profile --refit`, seconds before them; the beside runs, measured once,
are kept): `moemesh plan --json` with the same shape, seed (so the same requests and arrival
times), lengths and traffic. It prints predicted vs measured throughput and p50/p90 TTFT and ITL
(each the median over the rounds) with the relative error. Every compute process runs on
`--cores` threads (default 1: one call at a time on one core, as the simulator models a machine
whose processes share cores).

Around each run (calibration or cell) it times how fast the machine wakes a blocked process
(bench_wake_round_trip, a pipe round trip between two processes): the cluster's speed follows
that latency's regimes, which last seconds (docs/planner.md). Each row records it, and a second
score predicts each cell run from the calibration runs of its regime: per calibration point, the
median of the --wake-neighbours rounds' runs whose latency was nearest the cell run's.

`--cpu-wake-latency-us 0` runs the cluster with the machine's idle cores polling instead of
halting (`moemesh up --cpu-wake-latency-us`, Linux PM QoS): faster, but the regimes remain
(docs/planner.md).

  bench/planner_validate.py --moemesh build/services/cli/moemesh --model /tmp/tiny [--quick]
"""
import argparse, json, os, random, re, shutil, signal, subprocess, sys, tempfile, time, urllib.request

CONFIGS = [  # (attention, experts, replicas, micro_batches)
    (1, 1, 1, 2), (1, 2, 1, 2), (1, 2, 2, 2), (1, 1, 1, 1), (1, 2, 1, 1), (1, 2, 2, 1),
]
# Two attention workers on this 2-core machine: outside what the simulator models (docs/planner.md,
# "Open points"); --configs 6,7 runs them.
CONFIGS += [(2, 2, 1, 2), (2, 4, 2, 1)]
DEFAULT_CONFIGS = 6
TRAFFIC = ["closed:1", "closed:16", "closed:64", "poisson:20"]


def traffic_cell(spec, requests):
    """plan's --traffic -> (bench flags, plan --traffic, requests as a multiple of --requests)."""
    kind, value = spec.split(":")
    if kind == "closed":  # at least 4 requests per client: a steady state, not one wave's start-up
        return ["--concurrency", value], spec, max(1, -(-4 * int(value) // requests))
    if kind == "poisson":  # more requests: 64 Poisson arrivals span +-12% of their mean
        return ["--rate", value], spec, 2
    raise SystemExit(f"--traffic {spec}: closed:N or poisson:RATE")
KEYS = ["tok_s", "ttft_p50", "ttft_p90", "itl_p50", "itl_p90"]


def wait_ready(url, proc, timeout=120):
    """Until a completion is answered: the HTTP front answers /v1/models before every worker and
    expert host has registered."""
    end = time.time() + timeout
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1}).encode()
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("moemesh up exited")
        try:
            req = urllib.request.Request(url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("cluster not ready")


def err(pred, meas):
    return (pred - meas) / meas * 100 if meas else float("nan")


def bench_metrics(path):
    b = json.load(open(path))
    out = {"tok_s": b["output_tokens_per_s"]}
    for k in ("ttft", "itl"):
        for q in ("p50", "p90"):
            out[f"{k}_{q}"] = b[f"{k}_ms"][q]
    return out


def plan_metrics(path):
    p = json.load(open(path))
    out = {"tok_s": p["output_tokens_per_s"]}
    for k in ("ttft", "itl"):
        for q in ("p50", "p90"):
            out[f"{k}_{q}"] = p[f"{k}_ms"][f"{q}_ms"]
    return out


def wake_probe(a):
    """The machine's wake-up round trip now (µs, the probe's median), or None without a probe."""
    if not a.wake_probe:
        return None
    out = subprocess.run([a.wake_probe, "--seconds", "0.3"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["p50_us"]


def probed(a, run):
    """run() between two wake-up probes: (its result, their mean or None)."""
    before = wake_probe(a)
    result = run()
    after = wake_probe(a)
    return result, None if before is None else (before + after) / 2


def matched_points(cal_wake, run_wake, n):
    """For each run j, per calibration point: the n rounds whose run of that point met the wake-up
    latency nearest run j's (round j first on a tie), sorted; round j alone where a probe is
    missing. cal_wake: per round, per calibration point."""
    points = len(cal_wake[0])
    calibration_probed = not any(None in c for c in cal_wake)
    out = []
    for j, w in enumerate(run_wake):
        if w is None or not calibration_probed:
            out.append(tuple((j,) for _ in range(points)))
            continue
        near = lambda k: sorted(range(len(cal_wake)), key=lambda i: (abs(cal_wake[i][k] - w), i != j))[:n]
        out.append(tuple(tuple(sorted(near(k))) for k in range(points)))
    return out


def predict_by_wake(a, r, cache):
    """Row r's runs, each predicted by a profile fitted on its wake-up regime's calibration: each
    point's p50/p90 the median of the --wake-neighbours rounds whose run of that point met the
    latency nearest the run's (matched_points). The medians of the predictions, per metric."""
    rounds = [re.sub(r"-fitted\d+\.json$", f"-round{i}.json", p) for i, p in enumerate(r["profiles"])]
    points = [json.load(open(p))["calibration"]["points"] for p in rounds]
    out = os.path.join(os.path.dirname(rounds[0]), "plan-wake.json")
    preds = []
    for pick, seed in zip(matched_points(r["calibration_wake_us"], r["wake_us"], a.wake_neighbours), r["seeds"]):
        key = (rounds[0], pick)
        if key not in cache:
            profile = json.load(open(rounds[0]))
            for k, pt in enumerate(profile["calibration"]["points"]):
                for f in ("ttft_p50_s", "itl_p50_s", "itl_p90_s"):
                    pt[f] = median([points[i][k][f] for i in pick[k]])
            measured = rounds[0].replace("-round0.json", f"-wake{len(cache)}.json")
            json.dump(profile, open(measured, "w"), indent=1)
            cache[key] = measured.replace(".json", "-fitted.json")
            subprocess.run([a.moemesh, "plan", "profile", "--refit", measured, "--out", cache[key]], check=True,
                           stdout=subprocess.DEVNULL)
        preds.append(plan_metrics(run_plan(a, cache[key], r["config"], r["traffic"], r["requests"], seed, out)))
    return {k: median([p[k] for p in preds]) for k in KEYS}


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="uniform:16:64")
    ap.add_argument("--output-len", default="32")
    ap.add_argument("--repeats", type=int, default=3, help="bench runs per cell: each metric's median")
    ap.add_argument("--seed", type=int, default=0,
                    help="first seed; every bench run has its own (fresh prompts: none from the prefix cache), "
                         "and plan predicts each with the same seed (the same requests and arrival times)")
    ap.add_argument("--configs", help="indices into the configurations, e.g. 0,2 (default: the first six)")
    ap.add_argument("--traffic", help="comma-separated closed:N / poisson:RATE (default: " + ",".join(TRAFFIC) + ")")
    ap.add_argument("--quick", action="store_true", help="2 configurations x 2 traffics")
    ap.add_argument("--cores", type=int, default=1,
                    help="moemesh up --cores (each compute process's threads), and the profile's engine timing: "
                         "the simulator runs each process one call at a time on the machine's shared cores")
    ap.add_argument("--cpu-wake-latency-us", type=int, default=-1,
                    help="moemesh up --cpu-wake-latency-us: hold the machine's idle cores to wake within this many "
                         "µs (0: they poll; needs root; default -1: leave them as they are)")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--json", help="write the rows here (with the profiles' and measurements' paths)")
    ap.add_argument("--out-dir", help="keep the profiles and bench reports here (default: a temp folder)")
    default_probe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "bench",
                                 "bench_wake_round_trip")
    ap.add_argument("--wake-probe", default=default_probe if os.path.exists(default_probe) else None,
                    help="bench_wake_round_trip's path (default: build/bench's, where built; none: no probes)")
    ap.add_argument("--wake-neighbours", type=int, default=2,
                    help="the second score's calibration: per point, the median of this many rounds' runs "
                         "nearest each cell run's wake-up latency")
    ap.add_argument("--replan", metavar="ROWS_JSON",
                    help="no cluster: refit the recorded profiles (plan profile --refit) and predict again "
                         "against the recorded measurements")
    a = ap.parse_args()
    if a.replan:
        rows = json.load(open(a.replan))
        refitted, wake_cache = {}, {}
        for r in rows:
            seeds = r.get("seeds", [a.seed])
            # Rows of older runs hold one profile fitted on all rounds: it predicts every round.
            profs = r.get("profiles") or [r["profile"]] * len(seeds)
            for prof in profs:
                if prof not in refitted:
                    refitted[prof] = prof.replace(".json", "-refit.json")
                    subprocess.run([a.moemesh, "plan", "profile", "--refit", prof, "--out", refitted[prof]],
                                   check=True, stdout=subprocess.DEVNULL)
            out = os.path.join(os.path.dirname(profs[0]), "replan.json")
            preds = [plan_metrics(run_plan(a, refitted[prof], r["config"], r["traffic"], r["requests"], s, out))
                     for prof, s in zip(profs, seeds)]
            for k in KEYS:
                r[k][0] = median([p[k] for p in preds])
            if r.get("wake_us"):
                r["matched"] = predict_by_wake(a, r, wake_cache)
        print_table(rows)
        return 0
    configs, traffic = (CONFIGS[:2], TRAFFIC[:2]) if a.quick else (CONFIGS[:DEFAULT_CONFIGS], TRAFFIC)
    if a.traffic:
        traffic = a.traffic.split(",")
    traffic = [traffic_cell(t, a.requests) for t in traffic]
    if a.configs:
        configs = [CONFIGS[int(i)] for i in a.configs.split(",")]
    seed = a.seed
    cal_seed = 5000  # the extra calibration runs' prompts: apart from plan profile's (1000...) and the cells'
    tmp = a.out_dir or tempfile.mkdtemp(prefix="planner-validate-")
    os.makedirs(tmp, exist_ok=True)
    rows, wake_cache = [], {}
    for (att, exp, rep, mb) in configs:
        port = a.port
        # The cluster's logs (its span lines: hundreds of MB a configuration) are kept only when
        # the configuration fails.
        logs = os.path.join(tmp, f"logs-{att}-{exp}-{rep}-{mb}")
        up = subprocess.Popen([a.moemesh, "up", "--model", a.model, "--attention", str(att), "--experts", str(exp),
                               "--replicas", str(rep), "--micro-batches", str(mb), "--port", str(port), "--cores", str(a.cores),
                               "--control-port", str(port + 10), "--admin-port", str(port + 20), "--log-dir", logs] +
                              (["--cpu-wake-latency-us", str(a.cpu_wake_latency_us)] if a.cpu_wake_latency_us >= 0
                               else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        done = False
        try:
            wait_ready(url, up)
            prof = os.path.join(tmp, f"profile-{att}-{exp}-{rep}-{mb}.json")
            subprocess.run([a.moemesh, "plan", "profile", "--model", a.model, "--out", prof, "--calibrate-url", url,
                            "--cores", str(a.cores), "--calibrate-repeats", "1",
                            "--calibrate-attention", str(att), "--calibrate-experts", str(exp),
                            "--calibrate-replicas", str(rep), "--calibrate-micro-batches", str(mb)],
                           check=True, stdout=sys.stderr)
            # Rounds, not cells one after the other: each round measures the calibration's own runs
            # again and then every traffic once, and its runs are predicted from its calibration.
            recorded = json.load(open(prof))
            cal_runs = [[] for _ in recorded["calibration"]["points"]]
            runs = {t[1]: [] for t in traffic}
            seeds = {t[1]: [] for t in traffic}
            wakes = {t[1]: [] for t in traffic}
            cal_wake = []  # per round, per calibration point: the wake-up latency its run met
            for i in range(a.repeats):
                round_wake = []
                for k, pt in enumerate(recorded["calibration"]["points"]):
                    run, wake = probed(a, lambda: calibration_run(a, url, pt, tmp, cal_seed))
                    cal_runs[k].append(run)
                    round_wake.append(wake)
                    cal_seed += 1
                cal_wake.append(round_wake)
                for bench_flags, plan_traffic, mult in traffic:
                    cell = f"{att}-{exp}-{rep}-{mb}-{plan_traffic.replace(':', '')}"
                    bj = os.path.join(tmp, f"bench-{cell}-{i}.json")
                    cmd = [a.moemesh, "bench", "--url", url, "--vocab", "250", "--json", bj, "--seed", str(seed),
                           "--requests", str(a.requests * mult), "--prompt-len", a.prompt_len, "--output-len",
                           a.output_len] + bench_flags
                    _, wake = probed(a, lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL))
                    runs[plan_traffic].append(bench_metrics(bj))
                    wakes[plan_traffic].append(wake)
                    seeds[plan_traffic].append(seed)
                    seed += 1
            profs = []
            for i in range(a.repeats):
                for k, pt in enumerate(recorded["calibration"]["points"]):
                    pt.update(cal_runs[k][i])
                measured, fitted = prof.replace(".json", f"-round{i}.json"), prof.replace(".json", f"-fitted{i}.json")
                json.dump(recorded, open(measured, "w"), indent=1)
                subprocess.run([a.moemesh, "plan", "profile", "--refit", measured, "--out", fitted], check=True,
                               stdout=subprocess.DEVNULL)
                profs.append(fitted)
            config = f"{att}/{exp}/{rep}/{mb}"
            for _, plan_traffic, mult in traffic:
                cell = f"{att}-{exp}-{rep}-{mb}-{plan_traffic.replace(':', '')}"
                n = a.requests * mult
                preds = [plan_metrics(run_plan(a, profs[i], config, plan_traffic, n, s,
                                               os.path.join(tmp, f"plan-{cell}-{i}.json")))
                         for i, s in enumerate(seeds[plan_traffic])]
                row = {"config": config, "traffic": plan_traffic, "requests": n, "profiles": profs,
                       "seeds": seeds[plan_traffic], "wake_us": wakes[plan_traffic], "calibration_wake_us": cal_wake,
                       "cpu_wake_latency_us": a.cpu_wake_latency_us}
                for k in KEYS:
                    row[k] = [median([p[k] for p in preds]), median([r[k] for r in runs[plan_traffic]]),
                              [r[k] for r in runs[plan_traffic]]]
                if a.wake_probe:  # each run predicted from the calibration runs of its wake-up regime
                    row["matched"] = predict_by_wake(a, row, wake_cache)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if a.json:  # as it goes: a long run cut short keeps what it measured
                    json.dump(rows, open(a.json, "w"), indent=1)
            done = True
        finally:
            os.killpg(up.pid, signal.SIGINT)
            up.wait(timeout=60)
            if done:
                shutil.rmtree(logs, ignore_errors=True)
            else:
                print(f"planner_validate: {att}/{exp}/{rep}/{mb} did not finish; its cluster's logs: {logs}",
                      file=sys.stderr)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)
    print_table(rows)
    return 0


def calibration_run(a, url, pt, tmp, seed):
    """One more run of a calibration point of `plan profile` (its lengths, concurrency or Poisson
    rate and request count; prompts of its own seed, none from the prefix cache): its p50/p90 in
    seconds."""
    bj = os.path.join(tmp, "calibration.json")
    load = ["--rate", str(pt["rate"])] if pt.get("rate", 0) > 0 else ["--concurrency", str(pt["concurrency"])]
    subprocess.run([a.moemesh, "bench", "--url", url, "--vocab", "250", "--json", bj, "--seed", str(seed)] + load +
                   ["--requests", str(pt["requests"]),
                    "--prompt-len", str(pt["prompt"]), "--output-len", str(pt["output"])],
                   check=True, stdout=subprocess.DEVNULL)
    m = bench_metrics(bj)
    return {f"{k}_s": m[k] * 1e-3 for k in ("ttft_p50", "itl_p50", "itl_p90")}


def run_plan(a, prof, config, traffic, requests, seed, out):
    att, exp, rep, mb = config.split("/")
    subprocess.run([a.moemesh, "plan", "--profile", prof, "--attention", att, "--experts", exp, "--replicas", rep,
                    "--micro-batches", mb, "--traffic", traffic, "--layers-per-event", "1", "--json", out,
                    "--requests", str(requests), "--prompt-len", a.prompt_len, "--output-len", a.output_len,
                    "--seed", str(seed)], check=True, stdout=subprocess.DEVNULL)
    return out


def print_table(rows):
    print("\n| config (attention/experts/replicas/micro-batches) | traffic | output tok/s pred / meas | "
          "TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p90 ms |")
    print("| --- | --- | " + " | ".join("---:" for _ in KEYS) + " |")
    errs = []
    for r in rows:
        cells = []
        for k in KEYS:
            pr, me, _ = r[k]
            e = err(pr, me)
            errs.append(abs(e))
            fmt = "{:.0f}" if k == "tok_s" else "{:.1f}"
            cells.append(f"{fmt.format(pr)} / {fmt.format(me)} ({e:+.0f}%)")
        print(f"| {r['config']} | {r['traffic']} | " + " | ".join(cells) + " |")
    within = sum(e <= 10 for e in errs)
    print(f"\n{within} of {len(errs)} cells within 10%; median error {median(errs):.1f}%, worst {max(errs):.0f}%")
    # The machine's own noise: the range of a cell's repeated runs relative to their median, and
    # the cells whose prediction lies inside the range of their repeated measurements.
    spread = sorted((max(r[k][2]) - min(r[k][2])) / r[k][1] * 100 for r in rows for k in KEYS if r[k][1])
    inside = sum(min(r[k][2]) <= r[k][0] <= max(r[k][2]) or abs(err(r[k][0], r[k][1])) <= 10 for r in rows for k in KEYS)
    print(f"run-to-run: a cell's runs span a median {median(spread):.1f}% of their median (p90 "
          f"{spread[int(0.9 * len(spread))]:.1f}%); {inside} of {len(errs)} predictions within 10% or inside their "
          "runs' range")
    # What a perfect predictor could score against medians this noisy: each cell's median taken as
    # the truth, against medians of as many runs drawn again from the cell's runs (bootstrap).
    rng = random.Random(0)
    trials = 200
    boot = {(n, k): [median([rng.choice(r[k][2]) for _ in r[k][2]]) for _ in range(trials)]
            for n, r in enumerate(rows) for k in KEYS if r[k][1]}
    hits = sum(abs(m - rows[n][k][1]) <= 0.1 * rows[n][k][1] for (n, k), meds in boot.items() for m in meds)
    print(f"noise floor: a prediction equal to each cell's median lands within 10% of a fresh median of as many runs "
          f"in {hits / trials:.0f} of {len(errs)} cells (bootstrap)")
    # Misses that noise does not explain: further from the cell's median than twice the spread of
    # those medians, printed so the model's own errors stand apart from the machine's.
    biased = []
    for (n, k), meds in boot.items():
        r = rows[n]
        pr, me = r[k][0], r[k][1]
        sd = (sum((m - me) ** 2 for m in meds) / trials) ** 0.5
        if abs(err(pr, me)) > 10 and abs(pr - me) > 2 * sd:
            biased.append(f"{r['config']} {r['traffic']} {k} {err(pr, me):+.0f}%")
    print(f"{len(biased)} misses beyond twice their median's spread: " + ("; ".join(biased) or "none"))
    # The same runs, each predicted from the calibration runs that met its wake-up latency.
    matched = [r for r in rows if r.get("matched")]
    if matched:
        hits = sum(abs(err(r["matched"][k], r[k][1])) <= 10 for r in matched for k in KEYS)
        wake = [w for r in matched for w in r["wake_us"]]
        print(f"by wake-up regime: {hits} of {len(matched) * len(KEYS)} cells within 10% with each run predicted from "
              f"the calibration runs that met the nearest wake-up round trips ({min(wake):.1f}-{max(wake):.1f} µs)")


if __name__ == "__main__":
    sys.exit(main())
