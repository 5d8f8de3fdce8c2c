#!/usr/bin/env python3
"""The llama.cpp comparison end to end on a small model (label `slow`): bench/llama_cpp_compare.py
makes a small bf16 Mixtral, exports it, runs one round of bench-engine, llama.cpp and the cluster
with fewer streams, and must report every median and ratio (positive, finite). Timing values are
not judged: this checks that the benchmark still measures what docs/performance.md reports.
Exit 77 when node-llama-cpp is not installed."""
import json
import math
import os
import subprocess
import sys
import tempfile

build, llama_dir = sys.argv[1], sys.argv[2]
if not os.path.isdir(os.path.join(llama_dir, "node_modules", "node-llama-cpp")):
    print("node-llama-cpp is not installed (scripts/bootstrap installs it)")
    sys.exit(77)
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "cmp.json")
    subprocess.run([sys.executable, os.path.join(root, "bench", "llama_cpp_compare.py"), "--preset", "small",
                    "--rounds", "1", "--threads", "1", "--sequences", "4", "--seq-prompt-tokens", "16",
                    "--seq-tokens", "8", "--decode-tokens", "8", "--build", build, "--json", out], check=True)
    result = json.load(open(out))
want = ["engine_decode_b1", "engine_prefill_512", "llama_decode_b1", "llama_prefill_512", "llama_seq_output",
        "cluster_decode_b1", "cluster_streams_output"]
for key in want:
    v = result["medians"].get(key)
    assert v is not None and math.isfinite(v) and v > 0, f"median {key} is {v}"
for key, v in result["ratios"].items():
    assert v is not None and math.isfinite(v) and v > 0, f"ratio {key} is {v}"
print("compare_smoke: every median and ratio present:", json.dumps(result["ratios"]))
