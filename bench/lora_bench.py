#!/usr/bin/env python3
"""Decode step time with many LoRA adapters in one batch vs the base model, in one run.

  bench/lora_bench.py --moemesh build/services/cli/moemesh [--preset small] [--arch mixtral]
                      [--batch 32] [--adapters 8] [--rank 16] [--rounds 5] [--out results.json]

Makes the preset's checkpoint (bf16) and --adapters random PEFT adapters on every target the
architecture has (attention q/k/v/o and every expert's projections; `moemesh mklora`), then times
`moemesh bench-engine --lora ...` decode steps of --batch sequences with the adapters assigned
round robin (8 adapters x 4 streams each for the defaults); bench-engine times each measurement
again without adapters right after, in the same process, and reports the ratio of each pair. The
machine is shared and noisy: the median over all pairs of all rounds is the result.
Acceptance (issue #16): LoRA / base <= 1.3.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

TARGETS = {"mixtral": "q_proj,k_proj,v_proj,o_proj,w1,w2,w3", "deepseek": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def measure(cli, model, batch, adapters):
    """(ms per step with the adapters, [LoRA/base ratio of each interleaved pair])."""
    cmd = [cli, "bench-engine", "--model", model, "--batches", str(batch), "--decode-tokens", "16", "--warmup", "2",
           "--repeats", "3", "--prefill-tokens", "16", "--json"]
    for a in adapters:
        cmd += ["--lora", a]
    d = json.loads(run(cmd))["decode"][0]
    return float(d["ms_per_step"]), [float(r) for r in d["lora_over_base_repeats"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moemesh", required=True)
    ap.add_argument("--arch", default="mixtral", choices=sorted(TARGETS))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", help="write the results as JSON")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moemesh-lora-bench-") as tmp:
        model = os.path.join(tmp, "model")
        run([a.moemesh, "mkmodel", "--arch", a.arch, "--preset", a.preset, "--out", model])
        adapters = []
        for i in range(a.adapters):
            adapters.append(os.path.join(tmp, f"lora{i}"))
            run([a.moemesh, "mklora", "--model", model, "--out", adapters[-1], "--targets", TARGETS[a.arch], "--rank",
                 str(a.rank), "--alpha", str(2 * a.rank), "--seed", str(i + 1)])
        lora, ratios = [], []
        for r in range(a.rounds):
            ms, pairs = measure(a.moemesh, model, a.batch, adapters)
            lora.append(ms)
            ratios += pairs
            print(f"round {r + 1}: {a.adapters} adapters {ms:.2f} ms/step, LoRA/base of each pair "
                  + ", ".join(f"x{p:.3f}" for p in pairs), flush=True)
    res = {"arch": a.arch, "preset": a.preset, "batch": a.batch, "adapters": a.adapters, "rank": a.rank,
           "targets": TARGETS[a.arch], "lora_ms_per_step": statistics.median(lora),
           "ratio_median": statistics.median(ratios), "ratios": ratios}
    print(f"median over {len(ratios)} interleaved pairs: {a.adapters} adapters cost x{res['ratio_median']:.3f} the "
          f"base model's step time ({res['lora_ms_per_step']:.2f} ms/step with them; target <= 1.3)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
