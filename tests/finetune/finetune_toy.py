#!/usr/bin/env python3
"""finetune_toy: `moemesh finetune` teaches the small Mixtral preset 50 made-up facts
("What is the code for item 17?" -> "The code is 4711.").

  --mode train   mkmodel, write the JSONL, finetune; the mean loss of the last epoch is at least 10x
                 below the first's, loss.csv / loss.png / checkpoint-epoch-N / the PEFT files are
                 there; with --self-check, the saved adapter read back (`finetune --eval-only`,
                 the training forward pass, greedy) answers >= 90% of the prompts exactly.
  --mode serve   the adapter `--mode train` left in --workdir served by
                 `moemesh up --lora-modules toy=DIR`: /v1/chat/completions with model "toy" at
                 temperature 0 answers >= 90% of the prompts exactly.
"""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as H  # noqa: E402

N_PROMPTS = 50
# Chosen so that training takes a few minutes on 2 cores (docs/finetune.md has the measurements).
TRAIN_FLAGS = ["--epochs", "40", "--lr", "2e-3", "--batch-size", "4", "--rank", "16", "--target-modules",
               "q_proj,k_proj,v_proj,o_proj,w1,w2,w3", "--seed", "1"]


def examples():
    rng = random.Random(7)
    codes = rng.sample(range(1000, 10000), N_PROMPTS)
    return [(f"What is the code for item {i + 1}?", f"The code is {c}.") for i, c in enumerate(codes)]


def train(args):
    os.makedirs(args.workdir, exist_ok=True)
    model, out, data = (os.path.join(args.workdir, x) for x in ("small-mixtral", "adapter", "toy.jsonl"))
    H.Cli(args.cli, dict(os.environ)).run("mkmodel", "--arch", "mixtral", "--preset", "small", "--seed", "1",
                                          "--out", model, timeout=300)
    with open(data, "w") as f:
        for prompt, completion in examples():
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    t0 = time.monotonic()
    p = subprocess.run([args.cli, "finetune", "--model", model, "--train-data", data, "--output-dir", out] +
                       TRAIN_FLAGS, capture_output=True, text=True, timeout=1200)
    secs = time.monotonic() - t0
    print(p.stderr.replace("\r", "\n")[-3000:], flush=True)
    H.check(p.returncode == 0, f"finetune exited {p.returncode}")

    rows = list(csv.DictReader(open(os.path.join(out, "loss.csv"))))
    H.check(rows and list(rows[0].keys()) == ["step", "epoch", "loss", "tokens_per_s"], "loss.csv's columns")
    epochs = sorted({int(r["epoch"]) for r in rows})
    mean = {e: sum(float(r["loss"]) for r in rows if int(r["epoch"]) == e) /
            sum(1 for r in rows if int(r["epoch"]) == e) for e in epochs}
    first, last = mean[epochs[0]], mean[epochs[-1]]
    print(f"mean loss epoch {epochs[0]} {first:.4f} -> epoch {epochs[-1]} {last:.4f} (x{first / last:.1f} lower), "
          f"{len(rows)} steps, finetune took {secs:.1f} s", flush=True)
    H.check(first >= 10 * last, f"the loss fell only x{first / last:.2f} (first epoch {first}, last {last})")
    H.check(os.path.getsize(os.path.join(out, "loss.png")) > 1000, "loss.png written")
    for d in [out] + [os.path.join(out, f"checkpoint-epoch-{e}") for e in epochs]:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            H.check(os.path.exists(os.path.join(d, f)), f"{d}/{f} written")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    H.check(cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32, f"adapter_config: {cfg}")

    if args.self_check:
        p = subprocess.run([args.cli, "finetune", "--eval-only", "--model", model, "--train-data", data,
                            "--output-dir", out], capture_output=True, text=True, timeout=600)
        H.check(p.returncode == 0, f"finetune --eval-only exited {p.returncode}: {p.stderr}")
        r = json.loads(p.stdout)
        for x in r["results"]:
            if not x["exact"]:
                print(f"  miss: expected {x['expected']!r}, generated {x['generated']!r}")
        print(f"self-check (training forward, greedy): {r['exact']}/{r['examples']} exact", flush=True)
        H.check(r["accuracy"] >= 0.9, f"only {r['exact']}/{r['examples']} answers exact")


def serve(args):
    model, out = os.path.join(args.workdir, "small-mixtral"), os.path.join(args.workdir, "adapter")
    H.check(os.path.exists(os.path.join(out, "adapter_model.safetensors")),
            f"no adapter in {out}: run --mode train first (ctest fixture finetune_toy)")
    logs = os.path.join(args.workdir, "serve")
    os.makedirs(logs, exist_ok=True)
    up, port = H.moemesh_up(args, logs, model, timeout=120, extra=("--lora-modules", f"toy={out}"))
    try:
        pairs = examples()
        prompts = os.path.join(logs, "prompts.json")
        with open(prompts, "w") as f:
            json.dump([p for p, _ in pairs], f)
        node_modules = H.node_packages(args, "openai")
        p = subprocess.run(["node", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ask_openai.mjs"),
                            f"http://127.0.0.1:{port}", "toy", prompts], capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, NODE_PACKAGES=node_modules))
        H.check(p.returncode == 0, f"the openai client failed ({p.returncode}): {p.stderr[-2000:]}")
        exact = 0
        for (prompt, completion), text in zip(pairs, json.loads(p.stdout)):
            if text.strip() == completion:
                exact += 1
            else:
                print(f"  miss: {prompt!r}: expected {completion!r}, got {text!r}")
        print(f"served adapter: {exact}/{N_PROMPTS} exact", flush=True)
        H.check(exact >= 0.9 * N_PROMPTS, f"only {exact}/{N_PROMPTS} answers exact")
        rc, _ = up.terminate_and_wait(timeout=30)
        H.check(rc == 0, f"moemesh up exited {rc} on SIGTERM")
    finally:
        up.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["train", "serve"], required=True)
    p.add_argument("--cli", required=True)
    p.add_argument("--router", help="moemesh-router (serve: the other binaries are next to it)")
    p.add_argument("--workdir", required=True, help="model, data and adapter (shared by both modes)")
    p.add_argument("--self-check", action="store_true", help="train: greedy answers with the training forward")
    p.add_argument("--cache-dir", help="serve: where scripts/bootstrap put the openai npm package")
    args = p.parse_args()
    t0 = time.monotonic()
    try:
        (train if args.mode == "train" else serve)(args)
    except H.TestFailure as e:
        print(f"FAIL: {e} ({time.monotonic() - t0:.1f} s)", flush=True)
        sys.exit(1)
    print(f"PASS in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
