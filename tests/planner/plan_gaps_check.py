#!/usr/bin/python3
"""`moemesh plan gaps`: a stream's inter-token gaps classed by what the requests beside it did in
their step. Two clients' per-request files as `moemesh bench --per-request` writes them: a stream
whose steps that start one of the other requests take 0.8 ms longer, and twelve requests from a
client whose clock started 40 ms later. The clocks are matched, the start gaps priced at 0.8 ms,
the run written as a trace; one file holding all of them (the simulator's) needs no matching; a
malformed line is refused with its file and line.

Usage: plan_gaps_check.py MOEMESH
"""
import csv
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checklist import Checks  # noqa: E402


def record(start, times, prompt):
    return {"start_s": start, "end_s": times[-1], "ttft_s": times[0] - start,
            "itl_s": [b - a for a, b in zip(times, times[1:])], "prompt_tokens": prompt,
            "output_tokens": len(times), "tenant": 0}


def main():
    cli = sys.argv[1]
    check = Checks("plan_gaps")

    rng = random.Random(3)
    firsts = list(range(20, 260, 20))
    stream = [0.01]
    for k in range(1, 300):
        stream.append(stream[-1] + rng.uniform(1e-3, 2e-3) + (8e-4 if k in firsts else 0.0))
    # Four tokens each, 0.1 ms after the stream's of the same step, on a clock 40 ms behind.
    beside = [record(stream[f] - 2e-3 - 0.04, [stream[f + i] + 1e-4 - 0.04 for i in range(4)], 16) for f in firsts]
    with tempfile.TemporaryDirectory(prefix="moemesh-gaps-") as work:
        sf, bf, one, bad, trace = (os.path.join(work, n) for n in
                                   ("stream.jsonl", "beside.jsonl", "one.jsonl", "bad.jsonl", "trace.csv"))
        with open(sf, "w") as f:
            f.write(json.dumps(record(0.0, stream, 32)) + "\n")
        with open(bf, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in beside)
        r = subprocess.run([cli, "plan", "gaps", "--stream", sf, "--beside", bf, "--json", "--trace-out", trace],
                           capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, "two clients classed: " + r.stderr.strip())
        g = json.loads(r.stdout or "{}")
        check(g.get("matched") == 12 and g.get("others") == 12, f"every first token matched: {g.get('matched')}")
        check(abs(g.get("offset_s", 0) - 0.04) < 3e-4, f"the beside clock put 40 ms later: {g.get('offset_s')}")
        starts = g.get("excess_s", {}).get("start", [])
        check(len(starts) == 12 and abs(statistics.median(starts) - 8e-4) < 3e-4,
              f"a start costs the stream 0.8 ms: {starts[:3]}...")
        with open(trace) as f:
            rows = list(csv.DictReader(f))
        check(len(rows) == 13 and float(rows[0]["arrival_s"]) == 0 and rows[0]["output_len"] == "300",
              "the run as a trace, the stream first")
        # One client's file (as `moemesh plan --per-request` writes a simulated run): one clock.
        with open(one, "w") as f:
            f.write(json.dumps(record(0.0, stream, 32)) + "\n")
            f.writelines(json.dumps(record(r["start_s"] + 0.04, [t + 0.04 for t in
                                           [r["start_s"] + r["ttft_s"]]], 16)) + "\n" for r in beside)
        r = subprocess.run([cli, "plan", "gaps", "--stream", one], capture_output=True, text=True, timeout=60)
        m = re.search(r"start: ([-+][0-9.]+) \(12\)", r.stdout)
        check(r.returncode == 0 and "12 of 12" in r.stdout and m and abs(float(m.group(1)) - 0.8) < 0.3,
              "one clock, text: " + r.stdout.replace("\n", " | "))
        with open(bad, "w") as f:
            f.write(json.dumps(record(0.0, stream, 32)) + "\n" + '{"start_s": 1}\n')
        r = subprocess.run([cli, "plan", "gaps", "--stream", bad], capture_output=True, text=True, timeout=60)
        check(r.returncode != 0 and f"{bad}:2:" in r.stderr, "a malformed line refused: " + r.stderr.strip())
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
