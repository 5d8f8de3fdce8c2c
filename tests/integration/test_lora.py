#!/usr/bin/env python3
"""lora: a cluster (1 router, 2 attention workers, 2 expert hosts) serving LoRA adapters beside the
base model computes what `moemesh generate --lora` computes in-process.

- --lora-modules: an attention-only and an expert-only adapter (the expert one is applied on the
  expert hosts, which load it from the shared folder); /v1/models lists both with the base as parent.
- Concurrent greedy requests mixing the base and both adapters: each gets the reference's tokens and
  logits (1e-5 relative), so rows of several adapters in one step do not disturb each other.
- The prefix cache keys include the adapter: the same prompt under another adapter is not restored
  from the first one's blocks (its logits would be the base's otherwise).
- Runtime loading (--allow-runtime-lora): POST /v1/load_lora_adapter serves a new adapter, a bad folder
  is a 400 naming the problem, /v1/unload_lora_adapter removes it (then 404).
- Tenants: a tenant may use only the adapters its entry lists; another tenant's adapter is a 404.
- Metrics: per-adapter request and token series on the router, LoRA cache hits/misses on the
  attention workers and expert hosts.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(3, 23)), [40, 41, 42, 43]]
MAX_TOKENS = 6


def metric_sum(proc, name, **labels):
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in proc.metrics().splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=5)
    adapters = {
        "attn": ("q_proj,k_proj,v_proj,o_proj", 1),
        "experts": ("w1,w2,w3", 2),
        "late": ("q_proj,v_proj,w2", 3),  # loaded at run time
    }
    paths = {}
    for name, (targets, seed) in adapters.items():
        paths[name] = os.path.join(tmp, f"lora-{name}")
        cli.run("mklora", "--model", model, "--out", paths[name], "--targets", targets, "--rank", 4, "--seed", seed,
                "--strength", 0.5)
    bad = os.path.join(tmp, "lora-bad")
    cli.run("mklora", "--model", model, "--out", bad, "--targets", "q_proj")
    with open(os.path.join(bad, "adapter_config.json")) as f:
        text = f.read()
    with open(os.path.join(bad, "adapter_config.json"), "w") as f:
        f.write(text.replace('"use_dora": false', '"use_dora": true'))

    items = [(name, p) for name in (None, "attn", "experts") for p in PROMPTS]

    def reference(item):
        name, prompt = item
        extra = ("--lora", paths[name]) if name else ()
        return cli.generate(model, prompt_ids=prompt, max_tokens=MAX_TOKENS, extra=extra)

    refs = H.run_in_threads(reference, items + [("late", PROMPTS[0])])
    H.check(refs[0]["output_ids"] != refs[len(PROMPTS)]["output_ids"] or
            H.rel_err(refs[0]["logits"][0], refs[len(PROMPTS)]["logits"][0]) > 1e-3,
            "the attention adapter does not change the reference's output: the test would prove nothing")

    keys = os.path.join(tmp, "tenants.json")
    H.tenants_file(keys, cli, [("acme", ["key-acme"], {"adapters": ["attn", "experts", "late"]}),
                              ("beta", ["key-beta"], {})])
    auth = {"acme": {"Authorization": "Bearer key-acme"}, "beta": {"Authorization": "Bearer key-beta"}}
    router_extra = ("--tenants", keys, "--allow-runtime-lora", "--lora-modules", f"attn={paths['attn']}",
                    "--lora-modules", f"experts={paths['experts']}")
    with H.Cluster(args, tmp, model, tag="lora") as c:
        c.up(attention=2, experts=2, kvstore=1, router_extra=router_extra)
        c.wait_scheduler_connected()

        st, models = H.http(c.api_port, "/v1/models", headers=auth["acme"])
        H.check(st == 200, f"/v1/models: {st} {models}")
        listed = {m["id"]: m for m in models["data"]}
        base = models["data"][0]["id"]
        for name in ("attn", "experts"):
            H.check(name in listed and listed[name]["parent"] == base, f"/v1/models lacks {name} with parent {base}: "
                                                                       f"{models}")

        def send(item):
            name, prompt = item
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                    "return_logits": True}
            if name:
                body["model"] = name
            st, ans = H.http(c.api_port, "/v1/completions", body, headers=auth["acme"])
            H.check(st == 200, f"{name or 'base'} {prompt}: HTTP {st} {ans}")
            return ans

        # Twice: the second round's prompts are in the prefix cache, each under its own adapter.
        for round_ in (1, 2):
            answers = H.run_in_threads(send, items)
            for (name, prompt), ans, ref in zip(items, answers, refs):
                H.compare_with_reference(f"round {round_} {name or 'base'} {prompt}", ans["choices"][0], ref)
                H.check(ans["model"] == (name or base), f"answer names model {ans['model']}, asked {name or base}")
        H.log(f"{len(items)} concurrent requests x2 (base + 2 adapters) equal the reference")

        # Tenants: beta lists no adapters.
        st, ans = H.http(c.api_port, "/v1/completions", {"model": "attn", "prompt": [1, 2], "max_tokens": 2},
                         headers=auth["beta"])
        H.check(st == 404 and ans["error"]["code"] == "model_not_found", f"beta asking for attn: {st} {ans}")

        # Runtime loading.
        st, ans = H.http(c.api_port, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": bad},
                         headers=auth["acme"])
        H.check(st == 400 and "DoRA" in ans["error"]["message"], f"loading a DoRA adapter: {st} {ans}")
        st, ans = H.http(c.api_port, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": paths["late"]},
                         headers=auth["acme"])
        H.check(st == 200, f"load_lora_adapter: {st} {ans}")
        st, ans = H.http(c.api_port, "/v1/completions",
                         {"model": "late", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
                          "return_token_ids": True, "return_logits": True}, headers=auth["acme"])
        H.check(st == 200, f"late adapter: {st} {ans}")
        H.compare_with_reference("late", ans["choices"][0], refs[-1])
        st, ans = H.http(c.api_port, "/v1/unload_lora_adapter", {"lora_name": "late"}, headers=auth["acme"])
        H.check(st == 200, f"unload_lora_adapter: {st} {ans}")
        st, ans = H.http(c.api_port, "/v1/completions", {"model": "late", "prompt": [1], "max_tokens": 1},
                         headers=auth["acme"])
        H.check(st == 404, f"an unloaded adapter still served: {st} {ans}")
        st, ans = H.http(c.api_port, "/v1/unload_lora_adapter", {"lora_name": "late"}, headers=auth["acme"])
        H.check(st == 404, f"unloading twice: {st} {ans}")

        # Metrics.
        for name in ("attn", "experts"):
            n = metric_sum(c.router, "moemesh_router_requests_total", model=name, status="200")
            H.check(n >= 2 * len(PROMPTS), f"router: moemesh_router_requests_total{{model={name}}} = {n}")
            toks = metric_sum(c.router, "moemesh_router_completion_tokens_total", model=name)
            H.check(toks >= 2 * len(PROMPTS) * MAX_TOKENS, f"router: completion tokens of {name} = {toks}")
        att_misses = sum(metric_sum(p, "moemesh_attention_lora_cache_events_total", event="miss") for p in c.attention)
        att_hits = sum(metric_sum(p, "moemesh_attention_lora_cache_events_total", event="hit") for p in c.attention)
        exp_misses = sum(metric_sum(p, "moemesh_expert_lora_cache_events_total", event="miss") for p in c.experts)
        exp_hits = sum(metric_sum(p, "moemesh_expert_lora_cache_events_total", event="hit") for p in c.experts)
        H.log(f"LoRA cache: attention {att_hits:.0f} hits / {att_misses:.0f} misses, experts {exp_hits:.0f} hits / "
              f"{exp_misses:.0f} misses")
        H.check(att_misses >= 1 and att_hits >= 1, "attention workers' LoRA cache saw no hits or no misses")
        H.check(exp_misses >= 1 and exp_hits >= 1, "expert hosts' LoRA cache saw no hits or no misses")
        c.check_all_alive()


if __name__ == "__main__":
    H.main(test)
