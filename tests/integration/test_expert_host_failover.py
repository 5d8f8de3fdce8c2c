#!/usr/bin/env python3
"""expert_host_failover: with --replicas 2, kill -9 one expert host while requests are in
flight. Every accepted request still completes and matches the reference (the attention workers
see the host's connection drop and retry its experts on their replica at once, long before
--dispatch-timeout-ms); the coordinator drops the host, and requests sent afterwards match too.
"""
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

MAX_TOKENS = 24
DISPATCH_TIMEOUT_MS = 1000


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=21)
    prompts = [[2 + i, 40 + 3 * i, 7, 100 + i, 9 * i + 1] for i in range(8)]
    later = [[11, 12, 13, 14], [50, 60, 70]]
    refs = H.run_in_threads(lambda p: cli.generate(model, prompt_ids=p, max_tokens=MAX_TOKENS), prompts + later)

    with H.Cluster(args, tmp, model, tag="failover") as c:
        c.up(attention=2, experts=4, replicas=2, router_extra=("--heartbeat-timeout-ms", "1500"),
             attention_extra=("--dispatch-timeout-ms", str(DISPATCH_TIMEOUT_MS)))
        victim = c.experts[1]
        finished = {}

        def send(i):
            # No return_logits here (logits are checked in cluster_matches_reference): big responses
            # load the router, whose coordinator then expires live members (see check_no_expiry).
            st, ans = c.complete({"prompt": prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0,
                                  "return_token_ids": True}, timeout=90)
            finished[i] = time.monotonic()
            return st, ans

        results = [None] * len(prompts)

        def run(i):
            results[i] = send(i)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        # Kill once the victim has computed rows for these requests (it is in the data path).
        deadline = time.monotonic() + 10
        while (victim.metric("moemesh_expert_rows_total") or 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        H.check(not finished or len(finished) < len(prompts), "every request finished before the kill: too fast")
        victim.popen.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.popen.wait(5)
        H.log(f"killed {victim.name} (pid {victim.pid}) with {len(prompts) - len(finished)} of {len(prompts)} "
              f"requests in flight")
        for t in threads:
            t.join()
        after_kill = sum(1 for t in finished.values() if t > killed_at)
        H.check(after_kill > 0, "no request was still in flight when the expert host died")
        for i, (st, ans) in enumerate(results):
            if st != 200:
                c.check_no_expiry(allowed={victim.name}, where=f"request {i} failed ({str(ans)[:200]}); ")
            H.check(st == 200, f"request {i} (in flight when {victim.name} died): HTTP {st}: {str(ans)[:300]}")
            H.compare_with_reference(f"request {i}", ans["choices"][0], refs[i], check_logits=False)
        H.log(f"{len(prompts)} requests ({after_kill} finished after the kill) match the reference")

        # The attention workers saw the failure and retried (their log names the dead host).
        # (a request in flight names the host; a drop seen between requests names its endpoint)
        failed = [p.name for p in c.attention
                  if f"host {victim.name} " in p.log_text() or f"host {victim.endpoint} dropped" in p.log_text()]
        H.check(failed, f"no attention worker logged a failed dispatch to {victim.name}: the kill did not hit the "
                        f"data path")
        # The coordinator drops it, and new requests are served by the remaining hosts.
        c.router.wait_log(rf"coordinator: {victim.name} missed its heartbeats, removed", timeout=10)
        answers = H.run_in_threads(
            lambda p: c.complete({"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                                  "return_logits": True}), later)
        c.check_no_expiry(allowed={victim.name})
        for j, (st, ans) in enumerate(answers):
            H.check(st == 200, f"a request after the removal: HTTP {st}: {str(ans)[:300]}")
            H.compare_with_reference(f"after the removal {j}", ans["choices"][0], refs[len(prompts) + j])
        c.check_all_alive([p for p in c.procs if p is not victim])
        st, _ = H.http(c.admin_port, "/readyz")
        H.check(st == 200, f"router /readyz {st} after losing one replica")
        H.log(f"after {victim.name} was removed: requests match the reference; attention workers that retried: "
              f"{failed}")


if __name__ == "__main__":
    H.main(test)
