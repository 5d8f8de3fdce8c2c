#!/usr/bin/env python3
"""llama.cpp as a numerical oracle for moemesh.

An f32 Mixtral or DeepSeek-MoE (`moemesh mkmodel --preset small --dtype f32`) is exported with
`moemesh export-gguf` and run greedily through llama.cpp (bench/llama_cpp_bench.mjs --greedy,
node-llama-cpp's prebuilt CPU build) and through `moemesh generate --temperature 0`: the token
ids must be equal for every prompt. Both sides get the same prompt ids (no tokenizer involved)
and go on past EOS. On a mismatch the test prints where the two diverge and moemesh's margin
between its top two logits there (a near tie points at rounding; a wide margin at the export or
the model: Q/K permutation, norms, rope theta, expert order, the top-k rule).

Exit 77 (ctest SKIP_RETURN_CODE) only when node or node-llama-cpp is not installed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MJS = os.path.join(ROOT, "bench", "llama_cpp_bench.mjs")
SKIP = 77

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Mixture-of-experts models route every token to a few of many feed-forward networks, so",
]


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {p.returncode}:\n{p.stderr.strip()[-3000:]}")
    return p.stdout


def last_json(out):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"FAIL: no JSON in output:\n{out[-2000:]}")


def top2_margin(logits_row):
    s = sorted(logits_row, reverse=True)
    return s[0] - s[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--llama-cpp-dir", required=True)
    ap.add_argument("--arch", default="mixtral", choices=["mixtral", "deepseek"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args()

    node = shutil.which("node")
    entry = os.path.join(a.llama_cpp_dir, "node_modules", "node-llama-cpp", "dist", "index.js")
    if not node or not os.path.exists(entry):
        print(f"SKIP: node or node-llama-cpp missing ({a.llama_cpp_dir}); run scripts/bootstrap")
        return SKIP
    env = dict(os.environ, MOEMESH_LLAMA_CPP_DIR=a.llama_cpp_dir)

    work = tempfile.mkdtemp(prefix="moemesh-llama-greedy-")
    try:
        model = os.path.join(work, a.arch)
        gguf = os.path.join(work, a.arch + ".gguf")
        run([a.cli, "mkmodel", "--arch", a.arch, "--preset", a.preset, "--dtype", "f32", "--seed", str(a.seed),
             "--out", model])
        run([a.cli, "export-gguf", "--model", model, "--out", gguf])

        prompts = []
        for text in TEXT_PROMPTS:
            ids = run([a.cli, "tokenize", "--tokenizer", model, "--text", text]).strip()
            prompts.append([int(x) for x in ids.split(",")])
        prompts.append(prompts[0][:1] + [(i * 7919 + 13) % 31000 + 500 for i in range(40)])  # arbitrary ids, no text
        assert all(len(p) >= 4 for p in prompts), prompts

        failures = 0
        for prompt in prompts:
            ids = ",".join(map(str, prompt))
            ours = last_json(run([a.cli, "generate", "--model", model, "--prompt-ids", ids, "--max-tokens",
                                  str(a.tokens), "--temperature", "0", "--ignore-eos", "--json"]))["output_ids"]
            theirs = last_json(run([node, MJS, "--model", gguf, "--greedy", "--prompt-ids", ids, "--max-tokens",
                                    str(a.tokens), "--threads", "1"], env=env))["output_ids"]
            if len(ours) != a.tokens or len(theirs) != a.tokens:
                print(f"FAIL: prompt {prompt[:8]}...: expected {a.tokens} tokens, moemesh {len(ours)}, "
                      f"llama.cpp {len(theirs)}")
                failures += 1
                continue
            if ours == theirs:
                print(f"ok: {len(prompt)}-token prompt -> {a.tokens} tokens equal: {ours[:12]}...")
                continue
            failures += 1
            k = next(i for i in range(a.tokens) if ours[i] != theirs[i])
            r = last_json(run([a.cli, "generate", "--model", model, "--prompt-ids", ids, "--max-tokens",
                               str(k + 1), "--temperature", "0", "--ignore-eos", "--json", "--logits"]))
            row = r["logits"][k]
            print(f"FAIL: {len(prompt)}-token prompt diverges at generated token {k}: moemesh {ours[k]} "
                  f"(logit {row[ours[k]]:.6f}), llama.cpp {theirs[k]} (moemesh's logit {row[theirs[k]]:.6f}); "
                  f"moemesh's top-2 margin there {top2_margin(row):.6f}\n  moemesh   {ours}\n  llama.cpp {theirs}")
        if failures:
            print(f"llama_cpp_greedy ({a.arch}): {failures} of {len(prompts)} prompts differ")
            return 1
        print(f"llama_cpp_greedy ({a.arch}): all {len(prompts)} prompts give the same {a.tokens} greedy tokens")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
