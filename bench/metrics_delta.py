#!/usr/bin/env python3
"""What each process's latency histograms saw during one command: every `*_seconds` histogram
series whose count grew, as its mean over the command (the change of `_sum` over the change of
`_count`) and that count. Used to split a run's time between the processes of a cluster, e.g. a
step as the router times it against the same step as the attention worker times it
(docs/performance.md, "Capacity planner").

  bench/metrics_delta.py --metrics router=http://127.0.0.1:8020/metrics \\
      --metrics attention-0=http://127.0.0.1:41234/metrics -- \\
      moemesh bench --url http://127.0.0.1:8000 --concurrency 1 --requests 24 --output-len 1

`moemesh up` prints every process's /metrics URL. The means are in milliseconds.
"""
import argparse
import os
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "observability"))
from prom_text import parse_metrics  # noqa: E402  (the Prometheus text format, as the tests read it)


def scrape(url):
    """{(histogram, labels): [sum, count]} of every *_seconds histogram the page holds."""
    out = {}
    for name, fam in parse_metrics(urllib.request.urlopen(url, timeout=10).read().decode()).items():
        if fam["type"] != "histogram" or not name.endswith("_seconds"):
            continue
        for sample, labels, value in fam["samples"]:
            part = sample[len(name):]
            if part in ("_sum", "_count"):
                shown = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
                out.setdefault((name, shown), [0.0, 0.0])[part == "_count"] = value
    return out


def deltas(before, after):
    """(histogram, labels, mean seconds, count) of the series whose count grew."""
    rows = []
    for key, (s, n) in sorted(after.items()):
        s0, n0 = before.get(key, (0.0, 0.0))
        if n > n0:
            rows.append((key[0], key[1], (s - s0) / (n - n0), int(n - n0)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", action="append", required=True, metavar="NAME=URL",
                    help="a process's /metrics, named in the report (repeat for each process)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- and the command to measure")
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the command to measure after --")
    targets = []
    for spec in a.metrics:
        name, sep, url = spec.partition("=")
        if not sep or not url:
            ap.error(f"--metrics {spec}: expected NAME=URL")
        targets.append((name, url))
    before = {name: scrape(url) for name, url in targets}
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        print(f"metrics_delta: the command exited with {rc}", file=sys.stderr)
        return rc
    for name, url in targets:
        for hist, labels, mean, count in deltas(before[name], scrape(url)):
            print(f"{name:14s} {hist}{labels}  mean {mean * 1e3:.3f} ms  x {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
