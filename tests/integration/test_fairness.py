#!/usr/bin/env python3
"""fairness: two tenants compete for one attention worker that runs 2 sequences at a time.

"heavy" (weight 1) floods 24 requests; a moment later "light" (weight 2) sends 8 of the same
size. The router admits by a virtual token counter, so while both are backlogged light gets
about 2/3 of the served tokens and its requests do not wait behind heavy's backlog:

- light's share of the requests completed while both were backlogged is 2/3 +- 0.17 (FIFO
  admission would give 8/32 = 0.25 at most);
- light's worst time to first token stays under 0.6 of the time heavy's backlog takes to drain
  (FIFO would make it wait for nearly all of it);
- the per-tenant counters (requests, prompt and completion tokens) add up, for billing.

Then isolation: each tenant's prompts are cached under its own salt. A prompt light has sent
is a prefix-cache hit for light but not for heavy; two tenants that opt into the shared scope do
share it.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HEAVY, LIGHT = 24, 8
BODY = {"max_tokens": 96, "temperature": 0, "ignore_eos": True, "stream": True}


def run(c, key, i, t_start, out):
    body = dict(BODY, prompt=[(i * 7 + j) % 200 + 3 for j in range(8)])
    times = []
    t0 = time.monotonic()
    st, ev = H.stream(c.api_port, "/v1/completions", body, headers={"Authorization": f"Bearer {key}"},
                      timeout=300, times=times)
    H.check(st == 200 and ev[-1] == "[DONE]", f"{key} request {i}: {st} {ev[-2:]}")
    out.append((key, time.monotonic() - t_start, times[0] - t0))  # (tenant, completed at, TTFT)


def fairness(c):
    results = []
    t_start = time.monotonic()
    threads = [threading.Thread(target=run, args=(c, "key-heavy", i, t_start, results)) for i in range(HEAVY)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # heavy's flood is queued and running
    t_light = time.monotonic() - t_start
    light = [threading.Thread(target=run, args=(c, "key-light", 100 + i, t_start, results)) for i in range(LIGHT)]
    for t in light:
        t.start()
    for t in threads + light:
        t.join()
    H.check(len(results) == HEAVY + LIGHT, f"{len(results)} of {HEAVY + LIGHT} requests finished")
    light_end = max(end for k, end, _ in results if k == "key-light")
    heavy_end = max(end for k, end, _ in results if k == "key-heavy")
    heavy_in_window = sum(1 for k, end, _ in results if k == "key-heavy" and t_light <= end <= light_end)
    share = LIGHT / (LIGHT + heavy_in_window)
    H.log(f"fairness: light done at {light_end:.1f} s, heavy at {heavy_end:.1f} s; {heavy_in_window} heavy "
          f"requests completed meanwhile: light share {share:.2f} (weights say 0.67)")
    H.check(abs(share - 2 / 3) <= 0.17, f"light's share {share:.2f} is not within 0.17 of its weight share 0.67")
    H.check(heavy_end > light_end, "heavy's flood finished before light: the queue never formed")
    # FIFO admission would make light's first token wait for (nearly) all of heavy's backlog.
    worst = max(ttft for k, _, ttft in results if k == "key-light")
    drain = heavy_end - t_light
    H.check(worst <= 0.6 * drain, f"light's worst TTFT {worst:.2f} s is not bounded by 0.6 x heavy's backlog "
                                  f"drain time {drain:.2f} s")
    H.log(f"fairness: light's slowest TTFT {worst:.2f} s while heavy's backlog took {drain:.1f} s")
    for tenant, count in (("heavy", HEAVY), ("light", LIGHT)):
        req = sum(float(line.rsplit(" ", 1)[1]) for line in c.router.metrics().splitlines()
                  if line.startswith("moemesh_router_requests_total{") and f'tenant="{tenant}"' in line
                  and 'status="200"' in line)
        toks = sum(float(line.rsplit(" ", 1)[1]) for line in c.router.metrics().splitlines()
                   if line.startswith("moemesh_router_completion_tokens_total{") and f'tenant="{tenant}"' in line)
        H.check(req == count and toks == BODY["max_tokens"] * count, f"{tenant}: billing counters {req} requests, {toks} tokens")


def isolation(c):
    prompt = [(5 * j) % 300 + 1 for j in range(40)]  # two full 16-token blocks to cache

    def cached(key):
        st, a = H.http(c.api_port, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0},
                       headers={"Authorization": f"Bearer {key}"})
        H.check(st == 200, f"{key}: {st} {a}")
        return a["usage"]["prompt_tokens_details"]["cached_tokens"]

    H.check(cached("key-light") == 0, "light's first sending of the prompt was a cache hit")
    H.check(cached("key-light") == 32, "light's own prompt was not a cache hit the second time")
    H.check(cached("key-heavy") == 0, "heavy hit light's cached prompt: tenants are not isolated")
    H.check(cached("key-shared-a") == 0 and cached("key-shared-b") == 32,
            "two tenants in the shared scope do not share their cache")
    H.log("isolation: private tenants never hit each other's cache; shared-scope tenants do")


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=9)
    tenants = H.tenants_file(os.path.join(tmp, "tenants.json"), cli, [
        ("heavy", ["key-heavy"], {"weight": 1}), ("light", ["key-light"], {"weight": 2}),
        ("shared-a", ["key-shared-a"], {"prefix_cache": "shared"}),
        ("shared-b", ["key-shared-b"], {"prefix_cache": "shared"})])
    with H.Cluster(args, tmp, model, tag="fair") as c:
        c.up(attention=1, experts=1, kvstore=1,
             router_extra=("--tenants", tenants, "--max-running-per-worker", "2"))
        c.wait_scheduler_connected()
        fairness(c)
        isolation(c)
        c.check_all_alive()


if __name__ == "__main__":
    H.main(test)
