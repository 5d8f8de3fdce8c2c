#!/usr/bin/env python3
"""Decode throughput of the cluster against the in-process reference engine, same machine, same run.

  bench/cluster_vs_reference.py --moemesh build/services/cli/moemesh [--model DIR] [--requests 8]
                                [--max-tokens 32] [--attention 2] [--experts 2]

Baseline: `moemesh generate` (one process, local experts) generating the same tokens one
request at a time. Cluster: `moemesh up` with the given shape, all requests in flight at once.
Prints tokens/s of each and the ratio cluster/baseline (the machine is shared and noisy: only
the ratio within one run means something).
"""
import argparse, concurrent.futures, json, os, re, signal, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration"))
from harness import free_port  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--attention", type=int, default=2)
    ap.add_argument("--experts", type=int, default=2)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moemesh-bench-")
    model = a.model
    if not model:
        model = os.path.join(tmp, "small")
        subprocess.run([a.moemesh, "mkmodel", "--arch", "mixtral", "--preset", "small", "--seed", "1", "--out", model,
                        "--dtype", "f32"], check=True, stdout=subprocess.DEVNULL)
    prompts = [[1] + [100 + 7 * i + j for j in range(24)] for i in range(a.requests)]

    t0 = time.time()
    for p in prompts:
        subprocess.run([a.moemesh, "generate", "--model", model, "--prompt-ids", ",".join(map(str, p)),
                        "--max-tokens", str(a.max_tokens), "--ignore-eos", "--json"], check=True,
                       stdout=subprocess.DEVNULL)
    base_s = time.time() - t0
    base_tps = a.requests * a.max_tokens / base_s

    port, control = free_port(), free_port()
    up = subprocess.Popen([a.moemesh, "up", "--model", model, "--port", str(port), "--control-port", str(control),
                           "--admin-port", str(free_port()), "--attention", str(a.attention), "--experts",
                           str(a.experts), "--log-dir", os.path.join(tmp, "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in up.stdout:
            if "cluster ready" in line:
                break
        else:
            sys.exit("cluster did not start")

        def one(p):
            body = json.dumps({"prompt": p, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            return json.load(urllib.request.urlopen(req, timeout=300))["usage"]["completion_tokens"]

        one(prompts[0])  # warm-up
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as ex:
            tokens = sum(ex.map(one, prompts))
        cluster_s = time.time() - t0
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    cluster_tps = tokens / cluster_s
    print(f"baseline (moemesh generate, sequential, incl. process start): {base_tps:8.1f} tokens/s")
    print(f"cluster ({a.attention} attention, {a.experts} expert hosts, {a.requests} in flight): {cluster_tps:8.1f} tokens/s")
    print(f"ratio cluster/baseline: {cluster_tps / base_tps:.2f}")


if __name__ == "__main__":
    main()
