#!/usr/bin/env python3
"""long_context_128k (issue #15): a 131072-token context through the cluster.

A tiny Mixtral with max_position_embeddings 131072 (`moemesh mkmodel --max-position-embeddings`),
with and without a sliding window, served by one attention worker whose KV cache is sized by
`--kv-cache-mb` in f32 and in INT8 (`--kv-dtype`), the router prefilling in chunks of
`--step-token-budget` tokens: a prompt of 131070 tokens plus 2 generated ones completes (the whole
context, and one token more is refused with a 400 naming the
131072 limit. With the window the worker's KV use after the last step stays at the window's blocks
(moemesh_attention_kv_blocks{state="used"}), without it the cache holds the whole context.

Cases: --case window_f32 | window_int8 | full_f32 | full_int8 (default: all four).
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness as H  # noqa: E402

CTX = 131072
WINDOW = 4096
PROMPT = CTX - 2
CASES = ["window_f32", "window_int8", "full_f32", "full_int8"]


def model_for(cli, tmp, window):
    out = os.path.join(tmp, "tiny-128k-window" if window else "tiny-128k")
    if not os.path.isdir(out):
        args = ["mkmodel", "--arch", "mixtral", "--preset", "tiny", "--seed", "3", "--dtype", "f32", "--out", out,
                "--max-position-embeddings", str(CTX)]
        if window:
            args += ["--sliding-window", str(WINDOW)]
        cli.run(*args, timeout=120)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    H.check(cfg["max_position_embeddings"] == CTX, f"config.json max_position_embeddings {cfg['max_position_embeddings']}")
    return out, cfg


def run_case(args, tmp, cli, case):
    window = case.startswith("window")
    dtype = case.split("_")[1]
    model, cfg = model_for(cli, tmp, window)
    prompt = [3 + (i * 7919) % (cfg["vocab_size"] - 3) for i in range(PROMPT)]
    # The KV budget: a whole 128K context of the tiny preset is 64 MiB in f32, 20 MiB in INT8; a
    # window needs a few blocks, so the windowed cases get 8 MiB.
    mb = "8" if window else ("72" if dtype == "f32" else "24")
    with H.Cluster(args, tmp, model, tag=case) as c:
        # Chunks of 2048 under the window; 512 without (a chunk attends over up to 128K positions:
        # short steps, and a 5-minute step timeout, for two cores shared with other work).
        budget = "2048" if window else "512"
        # A long heartbeat timeout: on a machine busy with other clusters a worker computing a 128K
        # chunk may answer its heartbeats late, and being dropped would restart the whole prefill.
        c.up(attention=1, experts=1, router_extra=("--step-token-budget", budget, "--heartbeat-timeout-ms", "60000",
                                                       "--step-timeout-ms", "300000"),
             attention_extra=("--kv-cache-mb", mb, "--kv-dtype", dtype, "--compute-threads", "2",
                              "--micro-batches", "1", "--dispatch-timeout-ms", "120000"), timeout=60)
        # The worker's used KV blocks, sampled while the request runs: their peak.
        peak, done = [0.0], threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], kv_blocks_used(c.attention[0]))
                except (OSError, H.TestFailure):
                    pass
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            st, ans = c.complete({"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=3000)
        finally:
            done.set()
            sampler.join()
        secs = time.monotonic() - t0
        H.check(st == 200, f"{case}: HTTP {st}: {str(ans)[:500]}")
        usage = ans.get("usage", {})
        H.check(usage.get("prompt_tokens") == PROMPT and usage.get("completion_tokens") == 2,
                f"{case}: usage {usage}")
        used = peak[0]
        # Under the window a step holds the window's blocks plus its chunk's; without one the cache
        # ends up holding the whole context.
        blocks = (PROMPT + 2 + 15) // 16
        if window:
            bound = (WINDOW + int(budget) + 15) // 16 + 2
            H.check(0 < used <= bound, f"{case}: peak of {used} KV blocks used under a {WINDOW}-token window (> {bound})")
        else:
            H.check(used >= blocks - 64, f"{case}: peak of {used} KV blocks used for a {PROMPT + 2}-token context")
        # Too long by one: the error names the model's limit.
        st, err = c.complete({"prompt": prompt + [5], "max_tokens": 2, "temperature": 0})
        H.check(st == 400 and str(CTX) in err.get("error", {}).get("message", ""),
                f"{case}: {PROMPT + 1} + 2 tokens: HTTP {st} {err}")
        c.check_all_alive()
    H.log(f"{case}: {PROMPT} prompt tokens + 2 in {secs:.1f} s, peak KV blocks used {used:.0f}")
    return ans["choices"][0]


def kv_blocks_used(proc):
    for line in proc.metrics().splitlines():
        if line.startswith('moemesh_attention_kv_blocks{') and 'state="used"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise H.TestFailure(f"{proc.name}: no moemesh_attention_kv_blocks{{state=\"used\"}} sample")


def main():
    args = H.parse_args(lambda p: p.add_argument("--case", action="append", choices=CASES))
    cases = args.case or CASES
    import tempfile
    tmp = tempfile.mkdtemp(prefix="moemesh-128k-")
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    ok = True
    try:
        for case in cases:
            try:
                run_case(args, tmp, cli, case)
            except H.TestFailure as e:
                print(f"FAILED {case}: {e}")
                ok = False
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print("ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
