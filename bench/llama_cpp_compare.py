#!/usr/bin/env python3
"""moemesh against llama.cpp on the same weights, measured in the same run.

    bench/llama_cpp_compare.py [--model DIR | --preset medium --dtype bf16] [--threads N]
                               [--rounds 3] [--build DIR] [--json FILE] [--skip engine,cluster]

Exports the checkpoint to GGUF (`moemesh export-gguf`), then runs interleaved rounds, each
round: `moemesh bench-engine --json` (in-process engine), bench/llama_cpp_bench.mjs (llama.cpp,
same thread count), and a local cluster (`moemesh up --attention 1 --experts 2`, started once)
under `moemesh bench` at one stream and at 32 concurrent streams of 128-token prompts and 64 new
tokens. Interleaving spreads machine noise (other jobs, thermal state) over both engines alike.
Prints a table of medians over the rounds and the ratios; `--json` writes them too.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    print(f"llama_cpp_compare: {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout):
    log(" ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1] if len(cmd) > 1 else ''} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-2000:]}")
    return p


def run_json(cmd, timeout):
    """Runs cmd, returns the last stdout line that parses as a JSON object."""
    p = run(cmd, timeout)
    for line in reversed(p.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{' '.join(cmd)} printed no JSON object: {p.stdout[-500:]}")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def decode_at(engine, batch):
    for d in engine.get("decode", []):
        if d.get("batch") == batch:
            return d.get("tok_s")
    return None


class Cluster:
    """`moemesh up` in the background, ready when the router's /readyz answers."""

    def __init__(self, cli, model, threads, work, port=18531):
        self.port, self.admin = port, port + 3
        self.log = open(os.path.join(work, "up.log"), "w")
        cmd = [cli, "up", "--model", model, "--attention", "1", "--experts", "2", "--port", str(port),
               "--control-port", str(port + 1), "--admin-port", str(self.admin),
               "--log-dir", os.path.join(work, "cluster-logs")]
        if threads:
            cmd += ["--cores", str(threads)]
        log(" ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moemesh up exited {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the cluster was not ready within 300 s; see {self.log.name}")
            time.sleep(0.5)  # polling a readiness endpoint, not waiting for a result

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def cluster_round(cli, url, work, rnd, seqs, seq_prompt, seq_tokens, decode_tokens):
    out = {}
    one = os.path.join(work, f"cluster-c1-{rnd}.json")
    run([cli, "bench", "--url", url, "--concurrency", "1", "--requests", "3", "--prompt-len", "16",
              "--output-len", str(decode_tokens), "--seed", str(rnd), "--json", one], timeout=1800)
    r1 = json.load(open(one))
    itl = (r1.get("itl_ms") or {}).get("mean")
    out["decode_b1_tok_s"] = 1000.0 / itl if itl else None
    many = os.path.join(work, f"cluster-c{seqs}-{rnd}.json")
    run([cli, "bench", "--url", url, "--concurrency", str(seqs), "--requests", str(seqs),
              "--prompt-len", str(seq_prompt), "--output-len", str(seq_tokens), "--seed", str(100 + rnd),
              "--json", many], timeout=3600)
    out["streams_output_tok_s"] = json.load(open(many)).get("output_tokens_per_s")
    return out


def fmt(x, unit=""):
    if x is None:
        return "-"
    return f"{x:.2f}{unit}" if x < 100 else f"{x:.0f}{unit}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: make one with mkmodel)")
    ap.add_argument("--preset", default="medium", help="mkmodel preset when no --model (default medium)")
    ap.add_argument("--dtype", default="bf16", choices=["f32", "f16", "bf16"], help="mkmodel dtype when no --model")
    ap.add_argument("--gguf", help="use this GGUF instead of exporting one")
    ap.add_argument("--threads", type=int, default=0, help="threads for both engines (default: bench-engine's choice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-prompt-tokens", type=int, default=128)
    ap.add_argument("--seq-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--skip", default="", help="comma-separated: engine, llama, cluster")
    ap.add_argument("--json", help="also write the medians and ratios here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    skip = {s for s in a.skip.split(",") if s}
    bad = skip - {"engine", "llama", "cluster"}
    if bad:
        ap.error(f"--skip: unknown part(s) {', '.join(sorted(bad))} (engine, llama, cluster)")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")

    cli = os.path.join(a.build, "services", "cli", "moemesh")
    if not os.access(cli, os.X_OK):
        sys.exit(f"llama_cpp_compare: {cli} not found: build the moemesh target (or pass --build)")
    node = shutil.which("node")
    mjs = os.path.join(ROOT, "bench", "llama_cpp_bench.mjs")
    work = tempfile.mkdtemp(prefix="moemesh-llama-compare-")
    cluster = None
    try:
        model = a.model
        if not model:
            model = os.path.join(work, f"mixtral-{a.preset}-{a.dtype}")
            subprocess.run([cli, "mkmodel", "--arch", "mixtral", "--preset", a.preset, "--dtype", a.dtype,
                            "--seed", "1", "--out", model], check=True, stdout=subprocess.DEVNULL)
        gguf = a.gguf
        if not gguf and "llama" not in skip:
            gguf = os.path.join(work, "model.gguf")
            subprocess.run([cli, "export-gguf", "--model", model, "--out", gguf], check=True)
        threads = a.threads
        if "cluster" not in skip:
            cluster = Cluster(cli, model, threads, work)

        rounds = []
        for rnd in range(a.rounds):
            r = {}
            if "engine" not in skip:
                cmd = [cli, "bench-engine", "--model", model, "--json"]
                if threads:
                    cmd += ["--threads", str(threads)]
                try:
                    r["engine"] = run_json(cmd, timeout=3600)
                    threads = threads or r["engine"].get("threads", 0)
                except RuntimeError as e:  # bench-engine may not exist yet: keep the other columns
                    log(f"bench-engine failed, its column stays empty: {e}")
            if "llama" not in skip:
                cmd = [node, mjs, "--model", gguf, "--decode-tokens", str(a.decode_tokens),
                       "--sequences", str(a.sequences), "--seq-prompt-tokens", str(a.seq_prompt_tokens),
                       "--seq-tokens", str(a.seq_tokens)]
                if threads:
                    cmd += ["--threads", str(threads)]
                r["llama"] = run_json(cmd, timeout=3600)
                threads = threads or r["llama"].get("threads", 0)
            if cluster:
                r["cluster"] = cluster_round(cli, cluster.url, work, rnd, a.sequences, a.seq_prompt_tokens,
                                             a.seq_tokens, a.decode_tokens)
            rounds.append(r)
            with open(os.path.join(work, "rounds.json"), "w") as f:
                json.dump(rounds, f, indent=1)

        def col(part, get):
            return median([get(r[part]) for r in rounds if part in r])

        m = {
            "engine_decode_b1": col("engine", lambda e: decode_at(e, 1)),
            "engine_prefill_512": col("engine", lambda e: (e.get("prefill") or {}).get("tok_s")),
            "engine_decode_b32": col("engine", lambda e: decode_at(e, 32)),
            "engine_roofline_ratio": col("engine", lambda e: e.get("decode_roofline_ratio")),
            "llama_decode_b1": col("llama", lambda x: x["decode"]["tok_s"]),
            "llama_prefill_512": col("llama", lambda x: x["prefill"]["tok_s"]),
            "llama_seq_output": col("llama", lambda x: x["sequences"]["output_tok_s"]),
            "llama_seq_decode": col("llama", lambda x: x["sequences"]["decode_tok_s"]),
            "cluster_decode_b1": col("cluster", lambda c: c["decode_b1_tok_s"]),
            "cluster_streams_output": col("cluster", lambda c: c["streams_output_tok_s"]),
        }
        ratios = {
            "decode_b1_engine_over_llama": ratio(m["engine_decode_b1"], m["llama_decode_b1"]),
            "prefill_512_engine_over_llama": ratio(m["engine_prefill_512"], m["llama_prefill_512"]),
            "streams_cluster_over_llama": ratio(m["cluster_streams_output"], m["llama_seq_output"]),
            "decode_b32_engine_over_llama": ratio(m["engine_decode_b32"], m["llama_seq_decode"]),
            "decode_b1_cluster_over_engine": ratio(m["cluster_decode_b1"], m["engine_decode_b1"]),
        }
        n = a.sequences
        rows = [
            ("decode, batch 1 (tok/s)", m["engine_decode_b1"], m["llama_decode_b1"], m["cluster_decode_b1"],
             ratios["decode_b1_engine_over_llama"]),
            (f"prefill {512} tokens (tok/s)", m["engine_prefill_512"], m["llama_prefill_512"], None,
             ratios["prefill_512_engine_over_llama"]),
            (f"{n} streams, output (tok/s)", None, m["llama_seq_output"], m["cluster_streams_output"],
             ratios["streams_cluster_over_llama"]),
            (f"decode, batch {n} (tok/s)", m["engine_decode_b32"], m["llama_seq_decode"], None,
             ratios["decode_b32_engine_over_llama"]),
        ]
        print(f"\nmedians of {a.rounds} round(s), {threads or '?'} threads, model {model}")
        print(f"{'':32} {'moemesh':>10} {'llama.cpp':>10} {'cluster':>10} {'moemesh/llama':>14}")
        for name, e, l, c, rt in rows:
            print(f"{name:32} {fmt(e):>10} {fmt(l):>10} {fmt(c):>10} {fmt(rt, 'x'):>14}")
        print(f"cluster batch-1 / in-process batch-1: {fmt(ratios['decode_b1_cluster_over_engine'], 'x')}")
        if m["engine_roofline_ratio"] is not None:
            print(f"moemesh decode at {m['engine_roofline_ratio'] * 100:.0f}% of the memory roofline")
        report = {"threads": threads, "rounds": a.rounds, "model": model, "gguf": gguf, "medians": m,
                  "ratios": ratios, "per_round": rounds}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        if cluster:
            cluster.stop()
        if a.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
