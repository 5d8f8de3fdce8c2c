#!/usr/bin/python3
"""`moemesh plan profile --refit`: a calibrated profile's recorded runs fitted again without a
cluster. A roofline profile gets a calibration record (the deployment, three runs and the profile
before calibration); the refit keeps the record as it was, starts from the uncalibrated profile
and fits the cluster's own costs to the runs (they change), and a profile without a record is
refused with one line.

Usage: plan_refit.py MOEMESH
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checklist import Checks  # noqa: E402

POINTS = [
    dict(concurrency=1, prompt=16, output=32, requests=8, ttft_p50_s=0.05, itl_p50_s=0.012, itl_p90_s=0.015),
    dict(concurrency=1, prompt=512, output=32, requests=8, ttft_p50_s=0.4, itl_p50_s=0.013, itl_p90_s=0.016),
    dict(concurrency=32, prompt=16, output=32, requests=64, ttft_p50_s=0.2, itl_p50_s=0.03, itl_p90_s=0.05),
]


def run(cli, *args):
    return subprocess.run([cli, "plan", "profile", *args], capture_output=True, text=True, timeout=60)


def main():
    cli = sys.argv[1]
    check = Checks("plan_refit")

    with tempfile.TemporaryDirectory(prefix="moemesh-refit-") as work:
        base, calibrated, refit = (os.path.join(work, n) for n in ("base.json", "calibrated.json", "refit.json"))
        r = run(cli, "--hardware", "h100", "--out", base)
        check(r.returncode == 0, "roofline profile written: " + r.stderr.strip())
        with open(base) as f:
            profile = json.load(f)
        record = dict(attention=1, experts=1, replicas=1, micro_batches=2, processes_per_node=64, points=POINTS,
                      uncalibrated=profile)
        with open(calibrated, "w") as f:
            json.dump(dict(profile, calibration=record), f)

        r = run(cli, "--refit", calibrated, "--out", refit)
        check(r.returncode == 0, "refit: " + (r.stderr.strip() or r.stdout.strip()))
        with open(refit) as f:
            out = json.load(f)
        check(out["calibration"]["points"] == POINTS, "the three runs are recorded as they were")
        check(out["calibration"]["uncalibrated"] == profile, "the uncalibrated profile is kept")
        check(out["note"].endswith("; refitted"), "the note says refitted: " + out["note"])
        fitted = [k for k in ("router", "dispatch_overhead_s", "step", "step_jitter") if out[k] != profile[k]]
        check(len(fitted) >= 3, "the cluster's costs are fitted to the runs: changed %s" % fitted)

        r = run(cli, "--refit", base, "--out", os.path.join(work, "x.json"))
        lines = r.stderr.strip().splitlines()
        check(r.returncode == 1 and len(lines) == 1 and "was not calibrated" in lines[0],
              "an uncalibrated profile is refused: rc %d %r" % (r.returncode, r.stderr))

        # With beside runs (a stream and requests starting beside it) the start of a sequence is
        # priced: fitted until the simulated start excess is the recorded one.
        # (a stream of 4000 steps of ~13 ms as fitted; each request gone before the next arrives)
        stream = [[0.0, 32, 4000]] + [[0.05 + 0.4 * k, 32, 8] for k in range(6)]
        # Its steps that start a request measured 50 ms longer than their neighbours: more than the
        # prompt's rows on this profile explain.
        beside = dict(start_excess_s=0.05, runs=[stream])
        with open(calibrated, "w") as f:
            json.dump(dict(profile, calibration=dict(record, beside=beside)), f)
        r = run(cli, "--refit", calibrated, "--out", refit)
        check(r.returncode == 0, "refit with beside runs: " + (r.stderr.strip() or r.stdout.strip()))
        with open(refit) as f:
            out = json.load(f)
        check(out["calibration"]["beside"] == beside, "the beside runs are recorded as they were")
        check(0 < out["step"]["start_s"] < 0.05, "a step that starts sequences is priced, below the excess: %s"
              % out["step"])
        bad = dict(record, beside=dict(runs=[stream]))
        with open(calibrated, "w") as f:
            json.dump(dict(profile, calibration=bad), f)
        r = run(cli, "--refit", calibrated, "--out", refit)
        check(r.returncode == 1 and "calibration.beside" in r.stderr and "start_excess_s" in r.stderr,
              "beside runs without their excess are refused by name: %r" % r.stderr)
    return check.exit_code()


if __name__ == "__main__":
    sys.exit(main())
