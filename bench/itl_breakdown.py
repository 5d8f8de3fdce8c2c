#!/usr/bin/env python3
"""Where a run's inter-token gaps come from: each gap of each request classed by what else
happened in it, from `--per-request` files of `moemesh bench` (measured) and `moemesh plan`
(simulated) alike, so a prediction can be compared with its run class by class
(docs/planner.md, "Open points").

  moemesh bench ... --seed 41 --per-request measured.jsonl
  moemesh plan  ... --seed 41 --per-request simulated.jsonl
  bench/itl_breakdown.py measured.jsonl simulated.jsonl

Classes: a gap in which another request's first token came (a step that prefilled a prompt);
one that began within a typical gap of another request's last token (its stream closing, its
blocks going to the KV store); one in which a request arrived but no first token came; otherwise
by the requests decoding through the whole gap (1, 2, 3, 4 or more). Per class: its share of the gaps, p50 and p90, and
its share of the gaps beyond the run's own p90.
"""
import bisect
import json
import sys


def gaps(path):
    """(ms, prefill in gap, arrival in gap, requests decoding through it, a request finished just
    before it) per inter-token gap."""
    recs = [json.loads(line) for line in open(path)]
    recs = [r for r in recs if r.get("ttft_s") is not None]
    tokens = []
    for r in recs:
        t = [r["start_s"] + r["ttft_s"]]
        for g in r["itl_s"]:
            t.append(t[-1] + g)
        tokens.append(t)
    arrivals = sorted(r["start_s"] for r in recs)
    firsts = sorted(t[0] for t in tokens)
    lasts = sorted(t[-1] for t in tokens)
    spans = sorted((t[0], t[-1]) for t in tokens)
    # A step's tokens reach the client one after the other (streamed in turn: 0.1 ms apart here,
    # and a step's dozens of tokens milliseconds apart under load), so a gap's window for first
    # tokens is shifted a quarter of a typical gap later: a first token streamed just after this
    # stream's token of the same step still falls in the gap that step ended. With no shift (0.1
    # ms of slack) the simulator's first tokens, streamed after the step's decode tokens, fell in
    # the gap after.
    all_gaps = sorted(b - a for ts in tokens for a, b in zip(ts, ts[1:]))
    late = all_gaps[len(all_gaps) // 2] / 4 if all_gaps else 0.0
    out = []
    for ts in tokens:
        for lo, hi in zip(ts, ts[1:]):
            # Another request's first token in (lo, hi], both ends `late` later.
            prefill = bisect.bisect_right(firsts, hi + late) > bisect.bisect_right(firsts, lo + late)
            arrival = bisect.bisect_right(arrivals, hi) > bisect.bisect_left(arrivals, lo - 1e-3)
            decoding = sum(1 for a, b in spans[:bisect.bisect_right(spans, (lo, float("inf")))] if b >= hi)
            # Another request's last token within a typical gap before this one began (or with
            # this gap's first token): the work of its end lands in this gap.
            finished = bisect.bisect_right(lasts, lo + late) > bisect.bisect_right(lasts, lo - 4 * late)
            out.append(((hi - lo) * 1e3, prefill, arrival, decoding, finished))
    return out


def quantile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


CLASSES = [("another request's first token", lambda g: g[1]),
           ("another request just finished", lambda g: g[4] and not g[1]),
           ("an arrival, no first token", lambda g: g[2] and not g[1] and not g[4])]
CLASSES += [(f"decoding only, {n}{'+' if n == 4 else ''} running",
             lambda g, n=n: not g[1] and not g[2] and not g[4] and (g[3] == n if n < 4 else g[3] >= 4))
            for n in (1, 2, 3, 4)]


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for path in sys.argv[1:]:
        rows = gaps(path)
        if not rows:
            print(f"{path}: no inter-token gaps")
            continue
        all_ms = sorted(g[0] for g in rows)
        p90 = quantile(all_ms, 0.9)
        tail = [g for g in rows if g[0] > p90]
        print(f"{path}: {len(rows)} gaps, p50 {quantile(all_ms, 0.5):.2f} ms, p90 {p90:.2f} ms")
        for name, member in CLASSES:
            ms = sorted(g[0] for g in rows if member(g))
            if ms:
                share_tail = 100 * sum(1 for g in tail if member(g)) / max(1, len(tail))
                print(f"  {name:34s} {100 * len(ms) / len(rows):5.1f}% of gaps  p50 {quantile(ms, 0.5):6.2f}  "
                      f"p90 {quantile(ms, 0.9):6.2f}  {share_tail:4.0f}% of those beyond p90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
