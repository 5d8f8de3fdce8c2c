#!/usr/bin/env python3
"""rebalance: live load-driven re-placement (EPLB) under load loses and stalls nothing.

A router bias sends almost every token to experts 0 and 2 of every layer, which round-robin
placement puts on the same expert host (of 2), so that host computes nearly every row. With
--rebalance-interval-s the coordinator plans a re-placement from the measured load, the other host
loads a hot expert (or its replica), the table switches, and the first host drops what moved.
Greedy streams run across the whole move; every one must finish with the reference engine's
text (the same bias), no stream may pause for 1 s or more, and after the move the busiest host's
share of the rows must fall.
"""
import json
import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

BIAS = "0=6,2=5"
STREAMS = 6
MAX_TOKENS = 48


def host_rows(c):
    """Rows each expert host computed so far (moemesh_expert_rows_total summed per host)."""
    out = {}
    for p in c.experts:
        total = 0.0
        for line in p.metrics().splitlines():
            if line.startswith("moemesh_expert_rows_total{"):
                total += float(line.rsplit(" ", 1)[1])
        out[p.name] = total
    return out


def busiest_share(before, after):
    delta = {k: after[k] - before[k] for k in after}
    total = sum(delta.values())
    H.check(total > 0, f"no rows computed between the samples: {delta}")
    return max(delta.values()) / total


def run_streams(c, prompts, refs, label):
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True} for p in prompts]
    times = [[] for _ in bodies]
    results = [None] * len(bodies)

    def one(i):
        results[i] = H.stream(c.api_port, "/v1/completions", bodies[i], timeout=120, times=times[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worst = 0.0
    for i, (st, ev) in enumerate(results):
        H.check(st == 200, f"{label}: stream {i} answered {st}: {str(ev)[:300]}")
        H.check(ev and ev[-1] == "[DONE]", f"{label}: stream {i} did not end with [DONE] (lost): {ev[-2:]}")
        text = H.stream_text(ev)
        H.check(text == refs[i]["text"], f"{label}: stream {i} text {text!r} != the reference's {refs[i]['text']!r}")
        ts = times[i]
        worst = max([worst] + [b - a for a, b in zip(ts, ts[1:])])
    return worst, (min(t[0] for t in times), max(t[-1] for t in times))


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=41)
    prompts = [[5 + i, 30 + 7 * i, 11, 90 + i] for i in range(STREAMS)]
    refs = H.run_in_threads(
        lambda p: cli.generate(model, prompt_ids=p, max_tokens=MAX_TOKENS, logits=False, extra=["--router-bias", BIAS]),
        prompts)

    router = ("--rebalance-interval-s", "1", "--rebalance-min-rows", "2000", "--load-window-s", "4",
              "--rebalance-min-gain", "0.1")
    with H.Cluster(args, tmp, model, tag="rebalance") as c:
        c.up(attention=1, experts=2, replicas=1, router_extra=router, attention_extra=("--router-bias", BIAS),
             timeout=60)
        c.wait_scheduler_connected()
        rows0 = host_rows(c)
        mapped0 = {p.name: p.metric("moemesh_expert_mapped_weight_bytes") for p in c.experts}

        # Load until a re-placement has completed, checking every stream of every round.
        worst, spans, deadline = 0.0, [], time.monotonic() + 120
        rx = re.compile(r"coordinator: re-placement (\d+) done")
        while not rx.search(c.router.log_text()):
            H.check(time.monotonic() < deadline, "no re-placement completed within 120 s of skewed load:\n" +
                    "\n".join(l for l in c.router.log_text().splitlines() if "re-placement" in l))
            w, span = run_streams(c, prompts, refs, f"round {len(spans)}")
            worst, spans = max(worst, w), spans + [span]
        rows1 = host_rows(c)
        skew_before = busiest_share(rows0, rows1)
        log = c.router.log_text()
        H.log("; ".join(l.split("coordinator: ", 1)[1] for l in log.splitlines() if "re-placement" in l))
        H.check("aborted" not in log, "a re-placement aborted:\n" + log[-3000:])
        # The hosts loaded and dropped live (their logs), and the mapped bytes follow.
        moved = [p for p in c.experts if re.search(r"re-placement \d+: now serving", p.log_text())]
        H.check(moved, "no expert host logged a re-placement")
        mapped1 = {p.name: p.metric("moemesh_expert_mapped_weight_bytes") for p in c.experts}
        H.check(mapped1 != mapped0, f"the hosts' mapped bytes did not change: {mapped0} -> {mapped1}")

        # The same load after the move: the busiest host computes a smaller share of the rows.
        w, _ = run_streams(c, prompts, refs, "after the move")
        worst = max(worst, w)
        rows2 = host_rows(c)
        skew_after = busiest_share(rows1, rows2)
        H.log(f"busiest expert host's share of the rows: {skew_before:.2f} before the move, {skew_after:.2f} after; "
              f"longest pause between two tokens of any stream: {worst * 1000:.0f} ms; "
              f"mapped bytes {mapped0} -> {mapped1}")
        H.check(skew_after < skew_before - 0.05,
                f"the re-placement did not spread the load: busiest share {skew_before:.2f} -> {skew_after:.2f}")
        H.check(worst < 1.0, f"a stream paused {worst:.2f} s (bound 1 s)")
        st = json.loads(cli.run("status", "--router", c.control, "--json"))
        H.check(int(st.get("rebalances", 0)) >= 1 and int(st.get("placementMoves", 0)) >= 1,
                f"moemesh status does not show the re-placement: {st.get('rebalances')} re-placements, "
                f"{st.get('placementMoves')} moves")
        text = cli.run("status", "--router", c.control)
        H.check(re.search(r"re-placements [1-9]", text), f"moemesh status text does not show it:\n{text}")
        m = c.router.metrics()
        done = sum(float(l.rsplit(" ", 1)[1]) for l in m.splitlines()
                   if l.startswith('moemesh_coordinator_rebalances_total{outcome="done"}'))
        H.check(done >= 1, "moemesh_coordinator_rebalances_total{outcome=\"done\"} is 0")
        c.check_all_alive()
        c.check_no_expiry()


if __name__ == "__main__":
    H.main(test)
