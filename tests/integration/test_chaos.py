#!/usr/bin/env python3
"""chaos: kill -9 one process of each role while concurrent greedy streams run, on one cluster
(2 attention workers, 4 expert hosts x2 replicas, a KV store), in turn: an expert host, the KV
store, an attention worker, the router. After each kill every stream must finish (0 lost) with
exactly the reference engine's text, and the longest pause between two tokens of a stream that
spans the kill (its stall) must stay under the bound: 1 s for an expert host (its connection
drops, the dispatch goes to the replica at once), 2 s for the others (the coordinator removes a
member one suspect grace after its control connection drops; the router moves its sequences).

The router holds the clients' connections, so its death cuts them: it is started again on the same
ports (as `moemesh up` or a Deployment does), each client retries its request (as OpenAI's SDKs do
on a connection error), and the retry must give the reference text within 2 s of the kill. The
attention workers must then hold no KV blocks: the dead router's sequences are released when the
new one's first step arrives (a new router_epoch), not left until their ids come round again.

The measured stalls are printed (docs/performance.md, "Failures").
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

STREAMS = 8
MAX_TOKENS = 64
BOUNDS = {"expert": 1.0, "kvstore": 2.0, "attention": 2.0, "router": 2.0}


def prompts_for(phase):
    return [[3 + i + 10 * phase, 40 + 3 * i, 7, 100 + i + phase, 9 * i + 1] for i in range(STREAMS)]


def run_phase(c, refs, prompts, victim, role):
    # Kill once every stream is under way (a few tokens each), so the kill hits them mid-stream.
    def kill():
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait(5)

    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
    results, times, killed = H.streams_with_a_fault(c.api_port, bodies, kill)
    in_flight, stalls, before = 0, [], []
    for i, (st, ev) in enumerate(results):
        H.check(st == 200, f"{role} kill: stream {i} answered {st}: {str(ev)[:300]}")
        H.check(ev and ev[-1] == "[DONE]", f"{role} kill: stream {i} did not end with [DONE] (lost): {ev[-2:]}")
        text = H.stream_text(ev)
        H.check(text == refs[i]["text"], f"{role} kill: stream {i} text {text!r} != the reference's "
                                         f"{refs[i]['text']!r} (greedy output changed)")
        ts = times[i]
        if ts[-1] > killed:
            in_flight += 1
        stalls.append(H.stall_after(ts, killed))  # the longest pause that ends after the kill
        before.append(max([b - a for a, b in zip(ts, ts[1:]) if b <= killed], default=0.0))
    H.check(in_flight > 0, f"{role} kill: every stream had finished before the kill")
    worst = max(stalls)
    H.log(f"{role} ({victim.name}) killed with {in_flight}/{len(prompts)} streams in flight: longest stall "
          f"{worst * 1000:.0f} ms (bound {BOUNDS[role] * 1000:.0f} ms; longest gap before the kill "
          f"{max(before) * 1000:.0f} ms); every stream finished with the reference's text")
    H.check(worst < BOUNDS[role], f"{role} kill: a stream stalled {worst:.2f} s (bound {BOUNDS[role]} s); stalls per "
                                  f"stream: {[round(s, 3) for s in stalls]}")
    return worst


def retry_until_answered(c, body, times, deadline_s=30.0):
    """A client's retry: the request again until the (restarted) router takes it."""
    deadline = time.monotonic() + deadline_s
    while True:
        times.clear()
        try:
            st, ev = H.stream(c.api_port, "/v1/completions", dict(body, stream=True), times=times)
        except OSError:  # refused while the router starts
            st, ev = None, None
        if st == 200 or time.monotonic() > deadline:
            return st, ev
        time.sleep(0.02)  # refused, or 503 until an attention worker has registered again


def run_router_phase(c, refs, prompts):
    old = c.router

    def kill():
        old.popen.send_signal(signal.SIGKILL)
        old.popen.wait(5)
        c.restart_router()

    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in prompts]
    results, times, killed = H.streams_with_a_fault(c.api_port, bodies, kill)
    cut = [i for i, (st, ev) in enumerate(results) if not (st == 200 and ev and ev[-1] == "[DONE]")]
    H.check(cut, "router kill: no stream was cut (every stream had finished before the kill)")
    retried = {}  # stream -> ((status, events), event times) of its retry

    def retry(i):
        ts = []
        retried[i] = (retry_until_answered(c, bodies[i], ts), ts)

    H.run_in_threads(retry, cut)
    stalls = []
    for i in range(len(bodies)):
        st, ev = results[i]
        ts = times[i]
        if i in retried:
            (st, ev), new_times = retried[i]
            H.check(bool(new_times), f"router kill: stream {i}'s retry got no token: {st} {str(ev)[:300]}")
            stalls.append((new_times[0] if new_times else time.monotonic()) - max([t for t in ts if t <= killed],
                                                                                   default=killed))
        H.check(st == 200 and ev and ev[-1] == "[DONE]", f"router kill: stream {i} did not finish: {st} {ev and ev[-2:]}")
        text = H.stream_text(ev) if st == 200 else None
        H.check(text == refs[i]["text"], f"router kill: stream {i} text {text!r} != the reference's "
                                         f"{refs[i]['text']!r} (greedy output changed)")
    worst = max(stalls)
    H.log(f"router killed with {len(cut)}/{len(prompts)} streams cut, each retried: longest wait from the last "
          f"token before the kill to the retry's first {worst * 1000:.0f} ms (bound {BOUNDS['router'] * 1000:.0f} ms); "
          f"every stream finished with the reference's text")
    H.check(worst < BOUNDS["router"], f"router kill: a retried stream waited {worst:.2f} s (bound "
                                      f"{BOUNDS['router']} s); per stream: {[round(s, 3) for s in stalls]}")
    # The dead router's sequences gave their KV blocks back.
    for a in c.attention:
        if not a.alive():
            continue
        deadline = time.monotonic() + 10
        while (used := kv_used(a)) and time.monotonic() < deadline:
            time.sleep(0.05)
        H.check(used == 0, f"router kill: {a.name} still holds {used} KV blocks of the dead router's sequences")
    return worst


def kv_used(proc):
    for line in proc.metrics().splitlines():
        if line.startswith('moemesh_attention_kv_blocks{state="used"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=33)
    phases = [("expert", 1), ("kvstore", 0), ("attention", 1), ("router", 0)]
    prompts = {role: prompts_for(n) for n, (role, _) in enumerate(phases)}
    refs = {role: H.run_in_threads(lambda p: cli.generate(model, prompt_ids=p, max_tokens=MAX_TOKENS, logits=False),
                                   prompts[role])
            for role, _ in phases}

    with H.Cluster(args, tmp, model, tag="chaos") as c:
        c.up(attention=2, experts=4, replicas=2, kvstore=1, timeout=60)
        c.wait_scheduler_connected()
        stalls = {}
        for role, index in phases:
            if role == "router":
                stalls[role] = run_router_phase(c, refs[role], prompts[role])
                continue
            victim = {"expert": c.experts, "kvstore": c.kvstores, "attention": c.attention}[role][index]
            stalls[role] = run_phase(c, refs[role], prompts[role], victim, role)
        killed = ("expert-1", "kvstore-0", "attention-1", "router")
        c.check_all_alive([p for p in c.procs if p.alive() or p.name not in killed])
        c.check_no_expiry(allowed={"expert-1", "kvstore-0", "attention-1"})
        H.log("stalls: " + ", ".join(f"{r} {s * 1000:.0f} ms" for r, s in stalls.items()))


if __name__ == "__main__":
    H.main(test)
