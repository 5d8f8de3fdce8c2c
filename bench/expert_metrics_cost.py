#!/usr/bin/env python3
"""What the per-expert load metrics cost: attention step time with them on and off, same run.

  bench/expert_metrics_cost.py --cli build/services/cli/moemesh [--model DIR | --preset medium]
                               [--repeats 8] [--requests 4] [--max-tokens 16] [--json OUT]

Two clusters of the same shape (router, 1 attention worker, 2 expert hosts, KV store) run side
by side: "on" as in production, "off" with `moemesh-expert --no-expert-metrics` (no
moemesh_expert_rows_total{layer,expert} series, no load in heartbeats). Each repeat sends the
same batch of concurrent greedy completions (fresh prompts per repeat, so neither prefix cache
helps) to one cluster and then the other, alternating which goes first. Per repeat and cluster
the mean step time is read from the attention worker's moemesh_attention_step_duration_seconds
(sum/count deltas), and the expert hosts' CPU time per step from their process_cpu_seconds_total
(where the metrics' work is done; CPU time suffers less than wall time from a shared machine).
Reported: the medians of each, and the medians of the per-repeat ratios on/off (the cost is
ratio - 1). The machine may be shared: only same-run ratios mean anything.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "observability"))
from obs_cluster import Cluster, http, log, parse_metrics, tmpdir, total  # noqa: E402


def totals(cluster):
    """(attention step seconds, steps, CPU seconds of all expert hosts) so far."""
    fam = parse_metrics(cluster.scrape("attention-0")).get("moemesh_attention_step_duration_seconds", {"samples": []})
    get = {n: v for n, _, v in fam["samples"] if not n.endswith("_bucket")}
    cpu = sum(total(parse_metrics(cluster.scrape(n)), "process_cpu_seconds_total") for n in cluster.services
              if n.startswith("expert-"))
    return (get.get("moemesh_attention_step_duration_seconds_sum", 0.0),
            get.get("moemesh_attention_step_duration_seconds_count", 0.0), cpu)


def run_load(cluster, prompts, max_tokens):
    """All prompts in flight at once; returns (mean step seconds, steps, wall seconds, expert CPU seconds per step)."""
    s0, c0, cpu0 = totals(cluster)
    t0 = time.monotonic()

    def one(p):
        status, body = http(cluster.api("/v1/completions"),
                            {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}, timeout=600)
        if status != 200:
            raise RuntimeError(f"completion answered {status}: {body[:200]!r}")

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(one, prompts))
    wall = time.monotonic() - t0
    s1, c1, cpu1 = totals(cluster)
    steps = c1 - c0
    if not steps:
        raise RuntimeError("no attention steps were counted")
    return (s1 - s0) / steps, int(steps), wall, (cpu1 - cpu0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cli", required=True)
    ap.add_argument("--model", help="checkpoint folder (default: mkmodel --preset PRESET in a temp folder)")
    ap.add_argument("--preset", default="medium", choices=["tiny", "small", "medium"])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="concurrent completions per repeat")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    tmp = tmpdir("moemesh-bench-metrics-")
    model = a.model
    if not model:
        model = os.path.join(tmp, a.preset)
        log(f"writing the {a.preset} model")
        subprocess.run([a.cli, "mkmodel", "--arch", "mixtral", "--preset", a.preset, "--seed", "1", "--out", model],
                       check=True, stdout=subprocess.DEVNULL)
    results = {"on": [], "off": []}
    # One folder for both: the tags keep their logs apart.
    with Cluster(a.cli, tmp, model=model, tag="on", timeout=300) as on, \
            Cluster(a.cli, tmp, model=model, tag="off", expert_extra=("--no-expert-metrics",), timeout=300) as off:
        clusters = {"on": on, "off": off}
        warm = [f"Warm up request {i}: the weights come into memory." for i in range(a.requests)]
        for c in clusters.values():
            run_load(c, warm, 4)
        for r in range(a.repeats):
            prompts = [f"Repeat {r}, request {i}: a mixture of experts routes each token to two of its eight "
                       f"experts, and every expert host reports the rows it computed." for i in range(a.requests)]
            for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                step, steps, wall, cpu = run_load(clusters[name], prompts, a.max_tokens)
                results[name].append({"step_s": step, "steps": steps, "wall_s": wall, "expert_cpu_s_per_step": cpu})
                log(f"repeat {r} {name:3}: {steps} steps, mean step {step * 1e3:.2f} ms, expert CPU "
                    f"{cpu * 1e3:.2f} ms/step, {wall:.2f} s")
        rows_on = sum(v for n, _, v in parse_metrics(on.scrape("expert-0")).get(
            "moemesh_expert_rows_total", {"samples": []})["samples"])
        rows_off = parse_metrics(off.scrape("expert-0")).get("moemesh_expert_rows_total", {"samples": []})["samples"]
        if rows_on <= 0 or rows_off:
            raise SystemExit(f"the flag did not take: rows_total on={rows_on}, off has {len(rows_off)} series")
    summary = {"model": os.path.basename(os.path.normpath(model)), "repeats": a.repeats, "requests": a.requests,
               "max_tokens": a.max_tokens, "per_repeat": results}
    print(f"\n{'':26}{'on':>10}{'off':>10}{'ratio':>9}{'quartiles':>18}")
    for key, label in (("step_s", "attention step (ms)"), ("expert_cpu_s_per_step", "expert CPU/step (ms)")):
        med = {k: statistics.median(x[key] for x in v) for k, v in results.items()}
        ratios = [on_[key] / off_[key] for on_, off_ in zip(results["on"], results["off"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        summary[key] = {"median_on": med["on"], "median_off": med["off"], "median_ratio": statistics.median(ratios),
                        "ratio_quartiles": [q[0], q[2]]}
        print(f"{label:26}{med['on'] * 1e3:>10.2f}{med['off'] * 1e3:>10.2f}{statistics.median(ratios):>9.4f}"
              f"{q[0]:>9.3f}..{q[2]:.3f}")
    print(f"(median of {a.repeats} per-repeat ratios on/off; cost = ratio - 1)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
