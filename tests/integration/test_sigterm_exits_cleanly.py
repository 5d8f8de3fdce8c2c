#!/usr/bin/env python3
"""sigterm_exits_cleanly: SIGTERM to each service exits 0 within a few seconds, in the situations
a rolling restart meets: an attention worker with requests in flight (they still complete), a KV
store and an expert host of a running cluster, the router while workers and hosts are still
attached, and then the remaining services with the coordinator gone. EXIT_WITHIN_S in the
environment changes the limit (default 5 s), to measure a slow exit.
"""
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

EXIT_WITHIN_S = float(os.environ.get("EXIT_WITHIN_S", "5"))
# Expert hosts hold each layer's batch this long, so that a step spends most of its time awaiting
# expert replies, and the SIGTERM below lands in that wait (deterministically).
BATCH_WINDOW_US = 150000
failures = []


def stop(p, what):
    """SIGTERM; a slow or non-zero exit is recorded (the other services are still tried)."""
    t0 = time.monotonic()
    p.popen.send_signal(signal.SIGTERM)
    try:
        rc = p.popen.wait(max(EXIT_WITHIN_S, 30))
    except subprocess.TimeoutExpired:
        rc = None
    secs = time.monotonic() - t0
    tail = "\n    ".join(p.log_text().splitlines()[-6:])
    if rc is None or rc != 0 or secs > EXIT_WITHIN_S:
        failures.append(f"{p.name} ({what}): SIGTERM -> exit {rc} after {secs:.2f} s (expected 0 within "
                        f"{EXIT_WITHIN_S} s); its log ends:\n    {tail}")
        H.log(f"{p.name} ({what}): SIGTERM -> exit {rc} in {secs:.2f} s  <-- FAILED")
        if rc is None:
            p.kill()
    else:
        H.log(f"{p.name} ({what}): SIGTERM -> exit 0 in {secs:.2f} s")
    return secs


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=8)
    prompts = [[9, 8, 7, 6, 5], [1, 1, 2, 3, 5, 8]]
    refs = H.run_in_threads(lambda p: cli.generate(model, prompt_ids=p, max_tokens=3, logits=False), prompts)

    with H.Cluster(args, tmp, model, tag="sigterm") as c:
        c.start_router(3, replicas=2)
        for _ in range(3):
            c.start_expert(extra=("--batch-window-us", str(BATCH_WINDOW_US)))
        c.start_attention()
        c.start_attention()
        c.start_kvstore()
        c.wait_ready()

        # An attention worker in the middle of a step (awaiting expert replies): it exits 0
        # promptly, and the requests still complete (re-queued on the other worker).
        results = [None] * len(prompts)
        done_at = [None] * len(prompts)

        def send(i):
            try:
                results[i] = c.complete({"prompt": prompts[i], "max_tokens": 3, "temperature": 0,
                                         "return_token_ids": True}, timeout=60)
            except OSError as e:
                results[i] = (None, f"{type(e).__name__}: {e}")
            done_at[i] = time.monotonic()

        c.wait_scheduler_connected()
        before = {p.name: H.step_bytes_received(p.port) for p in c.attention}
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        # The first worker to receive a step is the one to stop (any one, when `ss` is missing).
        busy, deadline = c.attention[-1], time.monotonic() + 5
        while None not in before.values() and time.monotonic() < deadline:
            got = [p for p in c.attention if H.step_bytes_received(p.port) != before[p.name]]
            if got:
                busy = got[0]
                break
            time.sleep(0.005)
        time.sleep(BATCH_WINDOW_US / 2e6)  # into its first expert round trip
        in_flight = sum(r is None for r in results)
        H.check(in_flight > 0, "every request finished before the SIGTERM: too fast to test")
        t_term = time.monotonic()
        stop(busy, f"mid-step, {in_flight} of {len(prompts)} requests in flight")
        for t in threads:
            t.join()
        for i, (st, ans) in enumerate(results):
            H.check(st == 200, f"request {i}, in flight when {busy.name} got SIGTERM: HTTP {st}: {str(ans)[:300]}")
            H.compare_with_reference(f"request {i}", ans["choices"][0], refs[i], check_logits=False)
        H.log(f"the {len(prompts)} requests in flight completed and match the reference "
              f"({', '.join(f'{t - t_term:.1f}' for t in done_at)} s after the SIGTERM)")

        stop(c.kvstores[0], "a registered KV store")
        stop(c.experts[2], "one of three expert hosts, replicas 2")
        # The router, with an attention worker and two expert hosts still attached.
        stop(c.router, "the router, services still attached")
        # The rest, with the coordinator gone.
        stop(c.attention[0], "attention worker, coordinator gone")
        stop(c.experts[0], "expert host, coordinator gone")
        stop(c.experts[1], "expert host, coordinator gone")
        H.check(not failures, "\n".join(failures))


if __name__ == "__main__":
    H.main(test)
