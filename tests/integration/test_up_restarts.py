#!/usr/bin/env python3
"""up_restarts: `moemesh up --replicas 1` heals like Kubernetes. kill -9 of an expert host while
greedy streams run leaves its experts with no live host: the steps that need them wait (bounded,
moemesh_attention_dispatch_uncovered_waits_total) instead of failing, `moemesh up` restarts the
process after its backoff, the replacement registers, and every stream finishes with exactly the
reference engine's text (0 lost). `moemesh status` and the router's metrics show the restart.
The cluster runs with `--cpu-wake-latency-us 0`: its router holds the limit (its metric says so)
where the machine lets it (root), and runs with a warning in its log where not.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

STREAMS = 6
MAX_TOKENS = 48


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=41)
    prompts = [[5 + i, 30 + 2 * i, 11, 90 + i, 7 * i + 2] for i in range(STREAMS)]
    refs = H.run_in_threads(lambda p: cli.generate(model, prompt_ids=p, max_tokens=MAX_TOKENS, logits=False), prompts)

    port, admin, control = H.free_port(), H.free_port(), H.free_port_pair()
    out_path = os.path.join(tmp, "up.out")
    out = open(out_path, "wb")
    up = subprocess.Popen([args.cli, "up", "--model", model, "--attention", "1", "--experts", "2", "--replicas", "1",
                           "--no-kvstore", "--cores", "1", "--port", str(port), "--control-port", str(control),
                           "--admin-port", str(admin), "--log-dir", os.path.join(tmp, "logs"),
                           "--startup-timeout", "90", "--cpu-wake-latency-us", "0"],
                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), preexec_fn=H._die_with_parent)

    def up_text():
        if not out.closed:
            out.flush()
        with open(out_path, "rb") as f:
            return f.read().decode(errors="replace")

    def status():
        return json.loads(cli.run("status", "--router", f"tcp://127.0.0.1:{control}", "--json"))

    try:
        H.wait_up_ready(up, up_text, timeout=120)
        victim_pid = int(re.search(r"expert-0\s+pid (\d+)", up_text()).group(1))

        bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
        results, times, killed = H.streams_with_a_fault(port, bodies, lambda: os.kill(victim_pid, signal.SIGKILL))

        stalls = []
        for i, (st, ev) in enumerate(results):
            H.check(st == 200, f"stream {i} answered {st}: {str(ev)[:300]}")
            H.check(ev and ev[-1] == "[DONE]", f"stream {i} did not end with [DONE] (lost): {ev[-2:]}")
            text = H.stream_text(ev)
            H.check(text == refs[i]["text"], f"stream {i}: {text!r} != the reference's {refs[i]['text']!r}")
            stalls.append(H.stall_after(times[i], killed))
        in_flight = sum(1 for ts in times if ts[-1] > killed)
        H.check(in_flight > 0, "every stream had finished before the kill")
        H.check(re.search(r"up: expert-0 exited \(killed by signal 9\); restarting it in 1 s \(restart #1\)",
                          up_text()), f"moemesh up did not report the restart:\n{up_text()}")

        # The restart is visible: status (per member and in the summary line) and the metric.
        deadline = time.monotonic() + 30
        while True:
            s = status()
            expert0 = [v for v in s["services"] if v["instance"] == "expert-0"]
            if expert0 and expert0[0]["restarts"] == 1 and s["ready"]:
                break
            H.check(time.monotonic() < deadline, f"status never showed expert-0 back with 1 restart: {s}")
            time.sleep(0.2)
        text = cli.run("status", "--router", f"tcp://127.0.0.1:{control}")
        H.check(re.search(r"restarts 1;", text), f"moemesh status does not show the restart:\n{text}")
        st, body = H.http(admin, "/metrics")
        H.check(re.search(r'moemesh_coordinator_member_restarts\{[^}]*host="expert-0"[^}]*\} 1', body.decode()),
                "moemesh_coordinator_member_restarts{host=expert-0} is not 1")
        if os.access("/dev/cpu_dma_latency", os.W_OK):
            H.check(re.search(r"^moemesh_cpu_wake_latency_limit_microseconds 0$", body.decode(), re.M),
                    "moemesh up --cpu-wake-latency-us 0: the router does not show the limit held")
        else:
            logs = os.path.join(tmp, "logs")
            router_log = "".join(open(os.path.join(logs, f), errors="replace").read()
                                 for f in os.listdir(logs) if f.startswith("router"))
            H.check("--cpu-wake-latency-us 0: cannot open /dev/cpu_dma_latency" in router_log,
                    "without the permission the router's log does not say why it holds no limit")
        H.log(f"expert-0 killed with {in_flight}/{STREAMS} streams in flight: restarted by moemesh up, 0 lost, "
              f"every text equals the reference; longest stall {max(stalls) * 1000:.0f} ms (steps waited for the "
              f"replacement)")
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
        out.close()
    H.check(up.returncode == 0, f"moemesh up exited {up.returncode} after SIGTERM:\n{up_text()}")


if __name__ == "__main__":
    H.main(test)
