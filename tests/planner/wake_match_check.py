#!/usr/bin/python3
"""bench/planner_validate.py's wake-up regimes: the probe (bench_wake_round_trip) answers one JSON
line with a positive round trip and refuses a bad argument; each run is matched, per calibration
point, to the rounds whose run of that point met the nearest wake-up latency (its own round first
on a tie), and to its own round when a probe is missing.

Usage: wake_match_check.py BENCH_WAKE_ROUND_TRIP
"""
import json
import os
import subprocess
import sys
import types

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "..", "bench"))
from checklist import Checks  # noqa: E402
import planner_validate as pv  # noqa: E402


def main():
    probe = sys.argv[1]
    check = Checks("wake_match_check")

    out = subprocess.run([probe, "--seconds", "0.05"], capture_output=True, text=True)
    line = json.loads(out.stdout) if out.returncode == 0 else {}
    check(out.returncode == 0 and line.get("round_trips", 0) > 0, f"the probe answers one JSON line: {out.stdout.strip()}")
    check(0 < line.get("p10_us", 0) <= line.get("p50_us", 0) <= line.get("p90_us", 0),
          "its percentiles are positive and ordered")
    bad = subprocess.run([probe, "--rounds", "3"], capture_output=True, text=True)
    check(bad.returncode == 2 and "--rounds" in bad.stderr, f"an unknown argument is refused by name: {bad.stderr.strip()}")
    zero = subprocess.run([probe, "--seconds", "0"], capture_output=True, text=True)
    check(zero.returncode == 2 and "positive" in zero.stderr, "a duration of 0 is refused")

    a = types.SimpleNamespace(wake_probe=probe)
    w = pv.wake_probe(a)
    check(w is not None and w > 0, f"planner_validate reads the probe's median: {w}")
    result, mean = pv.probed(a, lambda: "ran")
    check(result == "ran" and mean is not None and mean > 0, "a probed run keeps its result and gets a latency")
    check(pv.probed(types.SimpleNamespace(wake_probe=None), lambda: 1) == (1, None), "no probe: no latency")

    # Three rounds of two calibration points each, the latency each point's run met.
    cal = [[21.0, 15.0], [15.0, 25.0], [25.0, 21.0]]
    check(pv.matched_points(cal, [15.5, 24.0], 1) == [((1,), (0,)), ((2,), (1,))],
          "per point, the round whose run met the nearest latency")
    check(pv.matched_points(cal, [21.0], 2) == [((0, 2), (1, 2))], "two neighbours: the two nearest, sorted")
    check(pv.matched_points(cal, [18.0, 18.0, 18.0], 1) == [((0,), (0,)), ((1,), (0,)), ((0,), (2,))],
          "a tie (18 between 15 and 21) goes to the run's own round, else to the first")
    check(pv.matched_points(cal, [None, 21.0], 1) == [((0,), (0,)), ((0,), (2,))], "a run without a probe: its own round")
    check(pv.matched_points([[21.0, None], [15.0, 25.0]], [15.0, 21.0], 1) == [((0,), (0,)), ((1,), (1,))],
          "a calibration run without a probe: every run its own round")
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
