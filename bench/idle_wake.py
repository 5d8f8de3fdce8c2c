#!/usr/bin/env python3
"""What a pause costs the next request: TTFT and inter-token gaps after idle pauses of several
lengths, the pauses interleaved (one request after each pause in turn, --rounds times) so the
machine's drift falls on all of them alike. The capacity planner's `idle_wake` cost is fitted on
this effect (docs/planner.md, "Profiles").

  bench/idle_wake.py --moemesh build/services/cli/moemesh --model /tmp/tiny [--gaps-ms 0,2,5,20,100]
"""
import argparse, http.client, json, os, random, signal, statistics, subprocess, sys, time

from planner_validate import wait_ready  # same folder


def one_request(port, rng, prompt_len, output_len):
    """TTFT and the inter-token gaps (ms) of one streamed completion with a fresh random prompt."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"prompt": [rng.randrange(250) for _ in range(prompt_len)], "max_tokens": output_len,
                       "stream": True, "temperature": 0})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    times = []
    while True:
        line = resp.fp.readline()
        if not line or b"[DONE]" in line:
            break
        if line.startswith(b"data:") and b'"text"' in line:
            times.append(time.perf_counter())
    conn.close()
    return (times[0] - t0) * 1e3, [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gaps-ms", default="0,2,5,20,100", help="pauses before a request, interleaved")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--port", type=int, default=18200)
    a = ap.parse_args()
    gaps = [float(g) / 1e3 for g in a.gaps_ms.split(",")]
    up = subprocess.Popen([a.moemesh, "up", "--model", a.model, "--attention", "1", "--experts", "1",
                           "--micro-batches", "1", "--cores", str(a.cores), "--port", str(a.port),
                           "--control-port", str(a.port + 10), "--admin-port", str(a.port + 20)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rng = random.Random(5)
    try:
        wait_ready(f"http://127.0.0.1:{a.port}", up)
        for _ in range(5):  # warm-up, not recorded
            one_request(a.port, rng, a.prompt_len, a.output_len)
        res = {g: ([], []) for g in gaps}
        for _ in range(a.rounds):
            for g in gaps:
                if g:
                    time.sleep(g)
                ttft, itls = one_request(a.port, rng, a.prompt_len, a.output_len)
                res[g][0].append(ttft)
                res[g][1].append(itls)
        print("| pause ms | TTFT p50 ms | inter-token gap p50 ms, 1st..8th | later gaps p50 ms |")
        print("| ---: | ---: | --- | ---: |")
        for g, (ttft, itls) in res.items():
            by_index = [statistics.median(l[k] for l in itls if len(l) > k) for k in range(8)]
            later = statistics.median(x for l in itls for x in l[8:])
            print(f"| {g * 1e3:.0f} | {statistics.median(ttft):.2f} | {' '.join(f'{x:.2f}' for x in by_index)} | "
                  f"{later:.2f} |")
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
