#!/usr/bin/env python3
"""expert_hosts_rejoin: expert hosts that the coordinator expired (a pause longer than the
heartbeat timeout: SIGSTOP, then SIGCONT) register again, and the cluster must still compute the
right thing: the placement table must say what each host really holds.

Two hosts, replicas 1: expert-0 holds slot 0, expert-1 slot 1. Both are paused until the
coordinator drops them, then expert-1 resumes first and re-registers before expert-0. (The same
thing happened in expert_host_failover when a busy router expired live hosts.)
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HEARTBEAT_TIMEOUT_MS = 800


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=4)
    prompt = [7, 1, 7, 2, 7, 3]
    ref = cli.generate(model, prompt_ids=prompt, max_tokens=4)

    with H.Cluster(args, tmp, model, tag="rejoin") as c:
        c.up(attention=1, experts=2, router_extra=("--heartbeat-timeout-ms", str(HEARTBEAT_TIMEOUT_MS)),
             attention_extra=("--dispatch-timeout-ms", "2000"))
        held = {p.name: p.wait_log(r"serving \d+ experts: (\S+)").group(1) for p in c.experts}
        body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "return_token_ids": True,
                "return_logits": True}
        st, ans = c.complete(body)
        H.check(st == 200, f"before the pause: HTTP {st}: {str(ans)[:300]}")
        H.compare_with_reference("before the pause", ans["choices"][0], ref)

        for p in c.experts:
            p.popen.send_signal(signal.SIGSTOP)
        for p in c.experts:
            c.router.wait_log(rf"coordinator: {p.name} missed its heartbeats, removed", timeout=10)
        c.experts[1].popen.send_signal(signal.SIGCONT)
        c.router.wait_log(r"coordinator: expert host expert-1 at \S+ serves \d+ experts \(placement v\d+\)\n"
                          r"(.|\n)*coordinator: expert host expert-1", timeout=10)
        c.experts[0].popen.send_signal(signal.SIGCONT)
        c.router.wait_log(r"coordinator: expert host expert-0 at \S+ serves \d+ experts \(placement v\d+\)\n"
                          r"(.|\n)*coordinator: expert host expert-0", timeout=10)
        c.wait_ready(10)
        time.sleep(0.3)  # the newest placement reaches the attention worker
        H.log(f"both hosts paused, dropped and back (expert-1 first); they hold {held}")

        st, ans = c.complete(body)
        if st != 200:
            rereg = [line for line in c.router.log_text().splitlines() if "coordinator: expert host" in line]
            H.check(False, f"after the hosts rejoined: HTTP {st}: {str(ans)[:400]}\nthe hosts map {held}; the "
                           f"coordinator's registrations:\n  " + "\n  ".join(rereg))
        H.compare_with_reference("after the rejoin", ans["choices"][0], ref)
        c.check_all_alive()
        H.log("after the rejoin the cluster still matches the reference")


if __name__ == "__main__":
    H.main(test)
