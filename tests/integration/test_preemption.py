#!/usr/bin/env python3
"""preemption: an attention worker whose KV cache holds a fraction of what the running requests
grow into. The scheduler preempts the newest sequences of the lowest priority, parks their blocks
in the KV store and resumes them later (prompt + tokens generated so far, sampler replayed):

- every request completes, greedy and seeded-sampled alike, with output identical to the same
  request sent alone (and streamed outputs are not repeated after a resume);
- moemesh_router_preemptions_total{reason="kv_full"} moved, and the worker restored resumed
  sequences' blocks from the KV store (prefix-cache hit tokens moved);
- priorities order admission and preemption: of 4 low-priority requests ("priority": "low",
  lowered per request) sent just before 3 normal ones, at most one (the oldest, which may keep
  its place) finishes before the normal ones; the others are the ones preempted to make room.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

KV_BLOCKS = 12  # 192 tokens; the 8 requests below need 8 x 4 blocks at their longest


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=8)
    bodies = []
    for i in range(8):
        b = {"prompt": [(11 * i + j) % 250 + 2 for j in range(20)], "max_tokens": 40, "ignore_eos": True,
             "return_token_ids": True, "temperature": 0}
        if i % 2:
            b.update(temperature=0.9, seed=100 + i)
        bodies.append(b)
    with H.Cluster(args, tmp, model, tag="preempt") as c:
        c.up(attention=1, experts=2, kvstore=1, attention_extra=("--kv-blocks", str(KV_BLOCKS)))
        c.wait_scheduler_connected()
        alone = []
        for b in bodies:
            st, a = c.complete(b)
            H.check(st == 200, f"request alone: {st} {a}")
            alone.append(a["choices"][0]["token_ids"])
        before = c.router.metric("moemesh_router_preemptions_total") or 0
        # Half streamed: a resumed stream must continue, not repeat what it already sent.
        def run(i):
            b = bodies[i]
            if i % 2 == 0:
                return c.complete(b)
            st, ev = H.stream(c.api_port, "/v1/completions", dict(b, stream=True), timeout=120)
            return st, ev
        res = H.run_in_threads(run, list(range(8)))
        text_alone = {}
        for i, (st, ans) in enumerate(res):
            H.check(st == 200, f"request {i} under KV pressure: {st} {ans}")
            if i % 2 == 0:
                H.check(ans["choices"][0]["token_ids"] == alone[i],
                        f"request {i}: {ans['choices'][0]['token_ids']} != alone {alone[i]}")
            else:
                if i not in text_alone:
                    _, a = c.complete(bodies[i])
                    text_alone[i] = a["choices"][0]["text"]
                H.check(H.stream_text(ans) == text_alone[i], f"stream {i}: {H.stream_text(ans)!r} != "
                                                             f"{text_alone[i]!r}")
        kv_full = sum(float(line.rsplit(" ", 1)[1]) for line in c.router.metrics().splitlines()
                      if line.startswith("moemesh_router_preemptions_total{") and 'reason="kv_full"' in line)
        H.check(kv_full > 0, f"no kv_full preemption happened (total before {before}); the test did not test")
        hits = c.attention[0].metric("moemesh_attention_prefix_cache_hit_tokens_total") or 0
        H.check(hits > 0, "resumed sequences restored nothing from the KV store")
        H.log(f"preemption: {kv_full:.0f} preemptions, {hits:.0f} tokens restored, all 8 outputs identical")
        priorities(c)
        c.check_all_alive()


def priorities(c):
    # 3 normal requests fill the 12 blocks at their longest (60 tokens = 4 blocks each).
    ends = {}

    def run(item):
        name, body, delay = item
        time.sleep(delay)
        st, a = c.complete(body, timeout=120)
        H.check(st == 200, f"{name}: {st} {a}")
        ends[name] = time.monotonic()

    def body(i, **extra):
        return {"prompt": [(13 * i + j) % 250 + 2 for j in range(20)], "max_tokens": 40, "ignore_eos": True,
                "temperature": 0, **extra}
    items = [(f"low-{i}", body(i, priority="low"), 0.0) for i in range(4)]
    items += [(f"normal-{i}", body(10 + i), 0.02) for i in range(3)]
    H.run_in_threads(run, items)
    # The oldest low request may keep its place (preempting the newer ones made room), so one low
    # request may finish first; without priorities the normal ones, being newest, would be the
    # ones preempted and all four low ones would finish first.
    last_normal = max(t for n, t in ends.items() if n.startswith("normal"))
    early_lows = [n for n, t in ends.items() if n.startswith("low") and t < last_normal]
    H.check(len(early_lows) <= 1, f"low-priority requests {early_lows} finished before the normal ones: "
                                  f"{sorted(ends, key=ends.get)}")
    H.log(f"priorities: finishing order {sorted(ends, key=ends.get)}")


if __name__ == "__main__":
    H.main(test)
