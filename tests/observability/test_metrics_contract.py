#!/usr/bin/env python3
"""The metric contract against a real cluster: every `stable` metric of docs/metrics.md is on its
service's /metrics with the documented type and labels, no undocumented moemesh_* metric
appears, the traffic-driven ones moved, and `promtool check metrics` accepts every dump.

  test_metrics_contract.py --cli build/services/cli/moemesh --contract docs/metrics.md [--promtool P]
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from obs_cluster import Cluster, drive_traffic, http, load_contract, log, parse_metrics, run_main, span_lines, total  # noqa: E402

# Metrics that must have moved after drive_traffic(), per service (the acceptance: "moves when
# traffic flows"). Planned metrics are checked only once the contract marks them stable.
MUST_MOVE = {
    "router": ["moemesh_router_requests_total", "moemesh_router_prompt_tokens_total",
               "moemesh_router_completion_tokens_total", "moemesh_router_request_duration_seconds",
               "moemesh_router_queue_time_seconds", "moemesh_router_time_to_first_token_seconds",
               "moemesh_router_inter_token_latency_seconds", "moemesh_router_steps_total",
               "moemesh_router_step_tokens", "moemesh_coordinator_placement_version",
               "moemesh_coordinator_expert_load_imbalance_ratio"],
    "attention": ["moemesh_attention_prefix_cache_query_tokens_total", "moemesh_attention_dispatch_requests_total",
                  "moemesh_attention_dispatch_round_trip_seconds", "moemesh_attention_step_duration_seconds",
                  "moemesh_attention_step_phase_seconds"],
    "expert": ["moemesh_expert_requests_total", "moemesh_expert_rows_total", "moemesh_expert_batch_rows",
               "moemesh_expert_compute_seconds", "moemesh_expert_received_bytes_total",
               "moemesh_expert_sent_bytes_total"],
    "kvstore": ["moemesh_kvstore_put_blocks_total"],
}


def check_service(name, service, fams, contract, problems, pending):
    own = {m: c for m, c in contract.items() if c["service"] in (service, "all")}
    for metric, c in own.items():
        fam = fams.get(metric)
        if fam is None:
            if c["status"] == "planned":
                pending.add(metric)
            elif c["status"] != "on-event":
                problems.append(f"{name}: {metric} ({c['status']}) is missing")
            continue
        if fam["type"] != c["type"]:
            problems.append(f"{name}: {metric} is a {fam['type']}, the contract says {c['type']}")
        for sample, labels, _ in fam["samples"]:
            got = set(labels) - ({"le"} if sample.endswith("_bucket") else set())
            if got != c["labels"]:
                problems.append(f"{name}: {sample} has labels {sorted(got)}, the contract says {sorted(c['labels'])}")
                break
        if c["status"] == "planned":
            log(f"  note: {metric} is exported now: mark it stable in docs/metrics.md")
    for metric in fams:
        if metric.startswith("moemesh_") and metric not in contract:
            problems.append(f"{name}: {metric} is not in docs/metrics.md")
        elif metric.startswith("moemesh_") and contract[metric]["service"] not in (service, "all"):
            problems.append(f"{name}: {metric} is documented for {contract[metric]['service']}, not {service}")
    for metric in MUST_MOVE.get(service, []):
        if contract.get(metric, {}).get("status") == "planned" and metric not in fams:
            continue
        fam = fams.get(metric)
        if fam is None:
            problems.append(f"{name}: {metric} (expected to move under traffic) is missing")
            continue
        moved = total(fams, metric) > 0 or any(v > 0 for _, _, v in fam["samples"])
        if not moved:
            problems.append(f"{name}: {metric} did not move under traffic")


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def check_trace(cluster, problems):
    """A client's traceparent: the router answers in the same trace and logs its span as one JSON line."""
    status, _, headers = http(cluster.api("/v1/completions"), {"prompt": "trace me", "max_tokens": 2},
                              headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}, with_headers=True)
    tp = {k.lower(): v for k, v in headers.items()}.get("traceparent", "")
    if status != 200 or not tp.startswith(f"00-{TRACE_ID}-") or tp.endswith("-00f067aa0ba902b7-01"):
        problems.append(f"traceparent: answered {status} with traceparent {tp!r}")
        return
    router_log = cluster.log_path("router")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for span in span_lines(router_log):
            if span.get("trace_id") == TRACE_ID:
                want = {"span": "completion", "service": "router", "trace_id": TRACE_ID,
                        "parent_span_id": "00f067aa0ba902b7", "span_id": tp.split("-")[2], "status": 200}
                bad = {k: span.get(k) for k, v in want.items() if span.get(k) != v}
                if bad or not span.get("duration_s", 0) > 0:
                    problems.append(f"trace span line {span} differs from {want}")
                return
        time.sleep(0.2)
    problems.append(f"no span line with trace id {TRACE_ID} in {router_log}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cli", required=True)
    p.add_argument("--contract", required=True)
    p.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    contract = load_contract(args.contract)
    log(f"contract: {len(contract)} metrics ({sum(c['status'] == 'planned' for c in contract.values())} planned)")
    pending = set()

    def body(tmp, problems):
        with Cluster(args.cli, tmp, attention=1, experts=2) as cluster:
            n = drive_traffic(cluster)
            log(f"{n} completions answered")
            check_trace(cluster, problems)
            time.sleep(2.5)  # heartbeats (expert load) reach the coordinator
            for name in cluster.services:
                service = Cluster.service_of(name)
                text = cluster.scrape(name)
                with open(os.path.join(tmp, f"{name}.prom"), "w") as f:
                    f.write(text)
                lint = subprocess.run([args.promtool, "check", "metrics"], input=text, capture_output=True, text=True)
                if lint.returncode != 0:
                    problems.append(f"{name}: promtool check metrics: {lint.stdout}{lint.stderr}".strip())
                fams = parse_metrics(text)
                log(f"{name}: {sum(1 for f in fams if f.startswith('moemesh_'))} moemesh_* families")
                check_service(name, service, fams, contract, problems, pending)
        if pending:
            log("pending (planned, not exported yet): " + ", ".join(sorted(pending)))

    return run_main(body, "moemesh-obs-contract-",
                    "every stable metric present with its labels, nothing undocumented, promtool clean", args.keep)


if __name__ == "__main__":
    sys.exit(main())
