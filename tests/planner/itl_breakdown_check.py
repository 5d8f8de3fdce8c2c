#!/usr/bin/python3
"""bench/itl_breakdown.py on request records whose gaps are known, and on `moemesh plan
--per-request` output: each gap in exactly one class, and the classes as constructed.

Usage: itl_breakdown_check.py MOEMESH
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import itl_breakdown  # noqa: E402


def check(ok, what):
    """Stop at the first failure: later checks read what earlier ones established."""
    print(("ok: " if ok else "FAIL: ") + what)
    if not ok:
        sys.exit(1)


def main():
    cli = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="moemesh-itl-") as work:
        # A runs alone 0-30 ms (tokens at 10, 20, 30); B arrives at 12 ms, its first token at 25 ms
        # (inside A's second gap), then 35 ms. C arrives at 50 ms with nothing else running. D
        # decodes at 100, 110 and 120 ms; E's first token comes from D's second step, streamed
        # 0.3 ms after D's token of it (110.3 ms), then 120.3 ms.
        hand = os.path.join(work, "hand.jsonl")
        with open(hand, "w") as f:
            for r in ({"start_s": 0.0, "ttft_s": 0.010, "itl_s": [0.010, 0.010]},
                      {"start_s": 0.012, "ttft_s": 0.013, "itl_s": [0.010]},
                      {"start_s": 0.050, "ttft_s": 0.005, "itl_s": [0.002, 0.002]},
                      {"start_s": 0.060, "ttft_s": None, "itl_s": [], "failure": "500"},
                      {"start_s": 0.095, "ttft_s": 0.005, "itl_s": [0.010, 0.010]},
                      {"start_s": 0.1005, "ttft_s": 0.0098, "itl_s": [0.010]}):
                f.write(json.dumps(dict(r, end_s=0.1, prompt_tokens=4, output_tokens=len(r["itl_s"]) + 1)) + "\n")
        g = itl_breakdown.gaps(hand)
        check(len(g) == 8, f"one gap per later token of the answered requests: {len(g)}")
        a_first, a_second = g[0], g[1]
        check(a_first[2] and not a_first[1], f"A's first gap holds B's arrival only: {a_first}")
        check(a_second[1] and a_second[3] == 1, f"A's second gap holds B's first token, A alone decoding: {a_second}")
        b_gap = g[2]
        check(not b_gap[1] and not b_gap[2] and b_gap[3] == 1, f"B's gap: nothing else, B alone: {b_gap}")
        check(all(x[3] == 1 and not x[1] and not x[2] for x in g[3:5]), f"C decodes alone: {g[3:5]}")
        d_first, d_second = g[5], g[6]
        check(d_first[1], f"D's first gap holds E's first token, streamed just after D's own: {d_first}")
        check(not d_second[1], f"D's second gap does not count E's first token again: {d_second}")

        # The simulator's records: every gap falls in exactly one class.
        sim = os.path.join(work, "sim.jsonl")
        r = subprocess.run([cli, "plan", "--hardware", "h100", "--attention", "1", "--experts", "2",
                            "--traffic", "poisson:20", "--requests", "60", "--prompt-len", "uniform:16:64",
                            "--output-len", "12", "--per-request", sim], capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, "plan --per-request runs: " + r.stderr.strip())
        lines = [json.loads(line) for line in open(sim)]
        check(len(lines) == 60 and all(len(x["itl_s"]) == 11 for x in lines), "60 requests of 11 gaps each")
        g = itl_breakdown.gaps(sim)
        counts = [sum(1 for x in g if member(x)) for _, member in itl_breakdown.CLASSES]
        check(len(g) == 660 and sum(counts) == len(g), f"each of the 660 gaps in one class: {counts}")
        out = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "bench", "itl_breakdown.py"), sim],
                             capture_output=True, text=True, timeout=60)
        check(out.returncode == 0 and "660 gaps" in out.stdout and "first token" in out.stdout,
              "the report names the gaps and classes: " + out.stdout[:200])
    print("itl_breakdown: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
