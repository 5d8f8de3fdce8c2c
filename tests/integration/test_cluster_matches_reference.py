#!/usr/bin/env python3
"""cluster_matches_reference: a real cluster (1 router, 2 attention workers, 4 expert hosts;
then the same with --replicas 2) computes exactly what `moemesh generate` computes in-process;
with --int4-experts on a checkpoint whose experts are GPTQ INT4 and attention float.

Concurrent requests (token-id and text prompts, one crossing a 16-token KV block), greedy: same
tokens, logits within 1e-5 relative per row; a seeded sampled request (temperature 0.8, seed 7):
same tokens as `moemesh generate --temperature 0.8 --seed 7`. Requests must reach both attention
workers (see attention_io_spread below).
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

ID_PROMPTS = [[1, 2, 3], [5, 17, 42, 9, 100, 7, 64], list(range(3, 23)), [200, 11], [7] * 5, [30, 31, 32, 33]]
TEXT_PROMPTS = ["Hello world, this is a test.", "The quick brown fox"]
MAX_TOKENS = 6
LONG_TOKENS = 12  # the [3..22] prompt decodes past position 32: a second and third KV block
SAMPLED = {"prompt": [4, 8, 15, 16, 23, 42], "temperature": 0.8, "seed": 7}


# Logits rows are vocab-wide (DeepSeek's tiny preset has 128815 tokens) and the reference runs
# cost CPU: with a big vocabulary fewer requests are sent, and only LOGITS_SUBSET ask for logits
# (the others still compare every token).
BIG_VOCAB = 65536
BIG_VOCAB_SKIP = {"ids3", "ids4", "text1"}
LOGITS_SUBSET = {"ids0", "ids2", "text0", "sampled"}


def requests(vocab):
    reqs = []
    for i, p in enumerate(ID_PROMPTS):
        reqs.append({"name": f"ids{i}", "prompt": p, "max_tokens": LONG_TOKENS if len(p) >= 16 else MAX_TOKENS,
                     "temperature": 0})
    for i, t in enumerate(TEXT_PROMPTS):
        reqs.append({"name": f"text{i}", "prompt": t, "max_tokens": MAX_TOKENS, "temperature": 0})
    reqs.append({"name": "sampled", "prompt": SAMPLED["prompt"], "max_tokens": MAX_TOKENS,
                 "temperature": SAMPLED["temperature"], "seed": SAMPLED["seed"]})
    if vocab >= BIG_VOCAB:
        reqs = [r for r in reqs if r["name"] not in BIG_VOCAB_SKIP]
    for r in reqs:
        r["logits"] = vocab < BIG_VOCAB or r["name"] in LOGITS_SUBSET
    return reqs


def references(cli, model, reqs):
    def ref(r):
        kw = {"max_tokens": r["max_tokens"], "temperature": r["temperature"], "seed": r.get("seed"),
              "logits": r["logits"]}
        if isinstance(r["prompt"], str):
            return cli.generate(model, prompt=r["prompt"], **kw)
        return cli.generate(model, prompt_ids=r["prompt"], **kw)

    return H.run_in_threads(ref, reqs)


def run_variant(args, tmp, cli, model, arch, reqs, refs, replicas):
    tag = f"{arch}-r{replicas}"
    with H.Cluster(args, tmp, model, tag=tag) as c:
        c.up(attention=2, experts=4, replicas=replicas)
        c.wait_scheduler_connected()
        before = {p.name: H.step_bytes_received(p.port) for p in c.attention}
        t0 = time.monotonic()

        def send(r):
            body = {k: v for k, v in r.items() if k not in ("name", "logits")}
            body.update(return_token_ids=True, return_logits=r["logits"])
            return c.complete(body)

        answers = H.run_in_threads(send, reqs)
        elapsed = time.monotonic() - t0
        worst = 0.0
        for r, ref, (status, ans) in zip(reqs, refs, answers):
            name = f"{tag}/{r['name']}"
            H.check(status == 200, f"{name}: HTTP {status}: {ans}")
            choice = ans["choices"][0]
            if isinstance(r["prompt"], str):
                H.check(ans["usage"]["prompt_tokens"] == len(ref["prompt_ids"]),
                        f"{name}: the router tokenized the text to {ans['usage']['prompt_tokens']} tokens, "
                        f"generate to {len(ref['prompt_ids'])}")
                H.check(choice.get("text") == ref.get("text"),
                        f"{name}: text {choice.get('text')!r} != reference {ref.get('text')!r}")
            # Sampled rows: the logits are pre-sampling, so they must match too.
            worst = max(worst, H.compare_with_reference(name, choice, ref, check_logits=r["logits"]))
        H.log(f"{tag}: {len(reqs)} concurrent requests in {elapsed:.2f} s match the reference "
              f"(logits of {sum(r['logits'] for r in reqs)}: worst row {worst:.2e} relative)")

        # Spread over both attention workers. Neither the workers' /metrics nor the router's expose
        # per-worker step counts, so the evidence is the bytes each worker received on its step
        # socket during the burst (tcp_info of its listening port's connections, via `ss`): only
        # StepRequests travel there.
        for p in c.attention:
            after = H.step_bytes_received(p.port)
            if after is None:
                H.log(f"{tag}: `ss` is not installed: the spread over attention workers is not checked")
                break
            got = after - before[p.name]
            H.log(f"{tag}: {p.name} received {got} bytes of StepRequests")
            H.check(got >= H.WIRE_PREFIX, f"{tag}: {p.name} received no StepRequest during {len(reqs)} concurrent "
                                          f"requests: they were not spread over both attention workers")
        c.check_all_alive()
        c.check_no_expiry(where=f"{tag}: ")


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel(args.arch, os.path.join(tmp, f"{args.arch}-tiny"), seed=11)
    if args.int4_experts:
        # Experts in GPTQ INT4, attention left in the checkpoint's float type: expert hosts and
        # attention workers each serve what the checkpoint holds for their part.
        quantized = os.path.join(tmp, f"{args.arch}-tiny-int4")
        cli.run("quantize", "--model", model, "--out", quantized, "--bits", "4", "--group-size", "32",
                "--skip-attention")
        model = quantized
    with open(os.path.join(model, "config.json")) as f:
        reqs = requests(json.load(f)["vocab_size"])
    t0 = time.monotonic()
    refs = references(cli, model, reqs)
    H.log(f"{args.arch}: {len(refs)} reference generations in {time.monotonic() - t0:.1f} s")
    for r in (1, 2):
        run_variant(args, tmp, cli, model, args.arch, reqs, refs, r)


if __name__ == "__main__":
    def options(p):
        p.add_argument("--arch", required=True, choices=["mixtral", "deepseek"])
        p.add_argument("--int4-experts", action="store_true", help="quantize the experts (moemesh quantize) first")

    H.main(test, options)
