#!/usr/bin/env python3
"""up_stops_on_signal: `moemesh up` stops its cluster on SIGINT and SIGTERM whichever of its
threads the kernel hands the signal to. OpenBLAS starts its pool when the library loads, before
main blocks the signals, so a process-directed signal can land on a pool thread: there SIGTERM's
default action killed `moemesh up` at once (no drain, no "stopping the cluster"), and a SIGINT
that the shell had ignored (a background job of a script) was dropped, leaving the cluster
running. Each signal here goes straight to such a thread (tgkill), with SIGINT ignored as a
script's background job starts it: `moemesh up` must say it stops, stop every process and exit 0.
"""
import ctypes
import os
import platform
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


def background_job():
    H._die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a non-interactive shell does for `cmd &`


def one_signal(args, tmp, model, sig):
    name = signal.Signals(sig).name
    out_path = os.path.join(tmp, f"up-{name}.out")
    with open(out_path, "wb") as out:
        # OpenBLAS with a pool of two: one thread of its own besides main.
        up = subprocess.Popen([args.cli, "up", "--model", model, "--attention", "1", "--experts", "1", "--no-kvstore",
                               "--cores", "1", "--port", str(H.free_port()), "--control-port",
                               str(H.free_port_pair()), "--admin-port", str(H.free_port()),
                               "--log-dir", os.path.join(tmp, f"logs-{name}")],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, OPENBLAS_NUM_THREADS="2"), preexec_fn=background_job)
    text = lambda: open(out_path, "rb").read().decode(errors="replace")  # noqa: E731
    try:
        H.wait_up_ready(up, text)
        children = [int(p) for p in re.findall(r"pid (\d+)", text())]
        others = sorted(int(t) for t in os.listdir(f"/proc/{up.pid}/task") if int(t) != up.pid)
        H.check(others, "moemesh up has no thread besides main (OpenBLAS's pool): nothing to hand the signal to")
        rc = H._libc.syscall(SYS_TGKILL[platform.machine()], up.pid, others[0], int(sig))
        H.check(rc == 0, f"tgkill: errno {ctypes.get_errno()}")
        try:
            code = up.wait(30)
        except subprocess.TimeoutExpired:
            raise H.TestFailure(f"{name} to thread {others[0]}: moemesh up still running after 30 s:\n{text()}")
        H.check(code == 0 and "stopping the cluster" in text(),
                f"{name} to thread {others[0]}: moemesh up exited {code} without stopping its cluster:\n{text()}")
        alive = [p for p in children if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        H.check(not alive, f"{name}: processes {alive} of the cluster still run")
        H.log(f"{name} to thread {others[0]} of moemesh up: cluster of {len(children)} processes stopped, exit 0")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=3)
    for sig in (signal.SIGINT, signal.SIGTERM):
        one_signal(args, tmp, model, sig)


if __name__ == "__main__":
    H.main(test)
