#!/usr/bin/env python3
"""One request's trace across processes: a completion sent with a known W3C `traceparent` to a
real cluster (router, attention worker, 2 expert hosts, KV store) is found, by its trace id, in
every service's log as JSON span lines whose ids chain up:

  client span -> router "completion" -> attention "sequence" -> expert "dispatch" (each host it
  used) and KV store "kv_get" / "kv_put"

(each child's parent_span_id is its parent's span_id), with the attributes each hop promises.
The router runs with --trace-sample-ratio 0: a header's sampled flag still decides (the traced
request above is followed in full), while a request sent with an unsampled traceparent and one
without any header leave no span line in any log.

  test_trace_spans.py --cli build/services/cli/moemesh [--keep]
"""
import argparse
import sys
import os
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from obs_cluster import Cluster, http, log, run_main, span_lines  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
UNSAMPLED_ID = "5d3e1f7a9b2c4d6e8f0a1b2c3d4e5f60"
CLIENT_SPAN = "b7ad6b7169203331"
# 40+ tokens: two full 16-token blocks to look up in the KV store and to publish when freed.
PROMPT = "A slow request can be followed across every process of the cluster by its trace id. " * 3


def wait_for(what, find, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = find()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def traced(cluster, name):
    """The span lines of a service's log that belong to TRACE_ID (as their trace or a link)."""
    out = []
    for s in span_lines(cluster.log_path(name)):
        if s.get("trace_id") == TRACE_ID:
            out.append(s)
        else:
            out += [dict(s, trace_id=TRACE_ID, parent_span_id=l["span_id"], linked=True)
                    for l in s.get("links", []) if l.get("trace_id") == TRACE_ID]
    return out


def check_trace(cluster, problems):
    # First a request its client chose not to sample (flags 00), then the traced one.
    # (Another prompt: the traced request's blocks must be new to the KV store, to be put.)
    status, _, headers = http(cluster.api("/v1/completions"), {"prompt": PROMPT.upper(), "max_tokens": 6},
                              headers={"traceparent": f"00-{UNSAMPLED_ID}-{CLIENT_SPAN}-00"}, with_headers=True)
    tp = {k.lower(): v for k, v in headers.items()}.get("traceparent", "")
    if status != 200 or not tp.startswith(f"00-{UNSAMPLED_ID}-") or not tp.endswith("-00"):
        problems.append(f"the unsampled completion answered {status} with traceparent {tp!r} "
                        "(expected its trace id, flags 00)")
    status, body, headers = http(cluster.api("/v1/completions"),
                                 {"prompt": PROMPT, "max_tokens": 6, "temperature": 0},
                                 headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}, with_headers=True)
    if status != 200:
        problems.append(f"the traced completion answered {status}: {body[:300]!r}")
        return
    # The worker frees (and publishes) a finished sequence in its next step: give it one.
    status, _ = http(cluster.api("/v1/completions"), {"prompt": "next", "max_tokens": 2})
    if status != 200:
        problems.append(f"the follow-up completion answered {status}")

    router = wait_for("router span", lambda: [s for s in traced(cluster, "router") if s.get("span") == "completion"])
    if len(router) != 1 or router[0].get("parent_span_id") != CLIENT_SPAN:
        problems.append(f"router: expected one completion span under the client's span, got {router}")
        return
    tp = {k.lower(): v for k, v in headers.items()}.get("traceparent", "")
    if tp.split("-")[2:3] != [router[0]["span_id"]]:
        problems.append(f"router: answered traceparent {tp!r}, its span line says {router[0]['span_id']}")

    seq = wait_for("attention span", lambda: [s for s in traced(cluster, "attention-0") if s.get("span") == "sequence"])
    if len(seq) != 1:
        problems.append(f"attention-0: expected one sequence span in the trace, got {seq}")
        return
    seq = seq[0]
    want = {"parent_span_id": router[0]["span_id"], "peer": "router", "end": "freed", "generated_tokens": 6}
    bad = {k: seq.get(k) for k, v in want.items() if seq.get(k) != v}
    if bad or not seq.get("prompt_tokens", 0) >= 33 or not seq.get("steps", 0) >= 6 or "cached_tokens" not in seq:
        problems.append(f"attention-0: sequence span {seq} differs from {want} (prompt >= 33 tokens, >= 6 steps)")
    log(f"attention span {seq['span_id']}: {seq['prompt_tokens']} prompt, {seq['generated_tokens']} generated, "
        f"{seq['cached_tokens']} cached tokens in {seq['steps']} steps, {seq['duration_s'] * 1e3:.1f} ms")

    dispatch = []
    for name in [n for n in cluster.services if n.startswith("expert-")]:
        mine = [s for s in traced(cluster, name) if s.get("span") == "dispatch"]
        for s in mine:
            if s.get("service") != "expert" or s.get("parent_span_id") != seq["span_id"] or s.get("peer") != "attention-0":
                problems.append(f"{name}: dispatch span {s} is not a child of the sequence span {seq['span_id']} "
                                "from attention-0")
                break
        log(f"{name}: {len(mine)} dispatch spans in the trace")
        dispatch += mine
    layers = {s.get("layer") for s in dispatch}
    if not dispatch or len(layers) < 2:
        problems.append(f"expert hosts: {len(dispatch)} dispatch spans in the trace over layers {sorted(layers)}, "
                        "expected every MoE layer's dispatch")

    kv = wait_for("kvstore spans", lambda: traced(cluster, "kvstore-0"))
    ops = {s.get("span") for s in kv}
    if ops != {"kv_get", "kv_put"}:
        problems.append(f"kvstore-0: spans {sorted(map(str, ops))} in the trace, expected kv_get and kv_put")
    for s in kv:
        if s.get("parent_span_id") != seq["span_id"] or s.get("peer") != "attention-0" or not s.get("blocks"):
            problems.append(f"kvstore-0: span {s} is not a child of the sequence span {seq['span_id']} with blocks")
    log(f"kvstore-0: {', '.join(sorted(map(str, ops)))} in the trace")

    # By now the unsampled request (sent first) was served, freed and published everywhere, and the
    # follow-up without a header was answered: at a sample ratio of 0 every span line logged is
    # the traced request's.
    for name in cluster.services:
        others = [s for s in span_lines(cluster.log_path(name)) if s.get("trace_id") != TRACE_ID]
        if others:
            problems.append(f"{name}: logged spans of requests not sampled: {others[:2]}")
    log("the unsampled trace and the header-less request: no span line in any log")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cli", required=True)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    def body(tmp, problems):
        with Cluster(args.cli, tmp, attention=1, experts=2, router_extra=("--trace-sample-ratio", "0")) as cluster:
            check_trace(cluster, problems)

    return run_main(body, "moemesh-obs-trace-", "one trace id followed through router, attention, expert hosts "
                    "and KV store, parent and child spans consistent", args.keep)


if __name__ == "__main__":
    sys.exit(main())
