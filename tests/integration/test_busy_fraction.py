#!/usr/bin/env python3
"""busy_fraction: the expert pools' autoscaling signal means something. The rate of
moemesh_expert_busy_seconds_total (the share of wall time an expert host was computing, what the
chart's KEDA query and prometheus-adapter rule scale on) is ~0 when idle and rises with the
number of concurrent streams: idle < 1 stream < 8 streams.
"""
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def busy(c):
    return sum(p.metric("moemesh_expert_busy_seconds_total") or 0.0 for p in c.experts)


def fraction_under(c, streams, seconds=3.0):
    """Busy seconds per wall second (summed over the hosts) while `streams` streams run for `seconds`."""
    stop = time.monotonic() + seconds
    errors = []

    def one(i):
        while time.monotonic() < stop:
            st, ev = H.stream(c.api_port, "/v1/completions",
                              {"prompt": [3 + i, 17, 29], "max_tokens": 24, "temperature": 0, "stream": True},
                              timeout=60)
            if st != 200:
                errors.append((st, str(ev)[:200]))

    b0, t0 = busy(c), time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    if not threads:
        time.sleep(seconds)  # idle: nothing to wait for but the clock
    for t in threads:
        t.join()
    H.check(not errors, f"{streams} streams: failed requests {errors[:3]}")
    return (busy(c) - b0) / (time.monotonic() - t0)


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    # The small preset: enough expert compute per row that more rows per batch show as busy time.
    model = cli.mkmodel("mixtral", os.path.join(tmp, "small-mixtral"), seed=5, preset="small")
    with H.Cluster(args, tmp, model, tag="busy") as c:
        c.up(attention=1, experts=2, replicas=1, timeout=60)
        c.wait_scheduler_connected()
        idle = fraction_under(c, 0)
        one = fraction_under(c, 1)
        eight = fraction_under(c, 8)
        H.log(f"expert hosts' busy fraction (summed over 2 hosts): idle {idle:.3f}, 1 stream {one:.3f}, "
              f"8 streams {eight:.3f}")
        H.check(idle < 0.02, f"busy while idle: {idle:.3f}")
        H.check(one > idle, f"1 stream did not raise the busy fraction: {idle:.3f} -> {one:.3f}")
        H.check(eight > one * 1.2, f"8 streams did not raise it over 1 stream: {one:.3f} -> {eight:.3f}")


if __name__ == "__main__":
    H.main(test)
