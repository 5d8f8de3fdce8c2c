#!/usr/bin/env python3
"""The source of dashboards/*.json (Grafana classic JSON, schemaVersion 39).

  make_dashboards.py --out dashboards        writes them
  make_dashboards.py --check dashboards      fails when the committed files differ (a test)

Every panel query filters on the chained `namespace` variable (and `model` / `tenant` where the
metric has that label); the datasource is the `${datasource}` variable, never a fixed uid.
MUST_HAVE_DATA lists, per dashboard, the panels that must return data while traffic flows:
tests/observability/test_prometheus.py evaluates every query and enforces it.
"""
import argparse
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace="$namespace"'
S5XX = ', status=~"5.."'


def rate(metric, sel=NS):
    return f"rate({metric}{{{sel}}}[$__rate_interval])"


def quantile(q, metric, by="", sel=NS):
    by = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({by}) ({rate(metric + '_bucket', sel)}))"


def error_ratio(sel, by=""):
    """5xx / all requests; 0 (not empty) while there are requests but no 5xx series yet."""
    errors, every = (f"sum {by}({rate('moemesh_router_requests_total', sel + s)})" for s in (S5XX, ""))
    return f"({errors} or {every} * 0) / {every}"


def avg_hist(metric, by="", sel=NS):
    grp = f" by ({by})" if by else ""
    return f"sum{grp} ({rate(metric + '_sum', sel)}) / sum{grp} ({rate(metric + '_count', sel)})"


class Board:
    def __init__(self, uid, title, description, variables=("namespace",)):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels = []
        self.must = []
        self._x = self._y = 0

    def panel(self, title, targets, kind="timeseries", unit="short", w=12, h=8, must=True, description="", **extra):
        """targets: [(expr, legend)] or [(expr, legend, {target fields})]."""
        if self._x + w > 24:
            self._x, self._y = 0, self._y + h
        p = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self._x, "y": self._y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [],
        }
        for i, t in enumerate(targets):
            expr, legend = t[0], t[1]
            tgt = {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            if len(t) > 2:
                tgt.update(t[2])
            p["targets"].append(tgt)
        p.update(extra)
        self._x += w
        self.panels.append(p)
        if must:
            self.must.append(title)
        return p

    def row(self, title):
        self._x, self._y = 0, self._y + 8
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}, "panels": []})
        self._y += 1

    def json(self):
        tmpl = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                 "current": {}, "hide": 0, "refresh": 1}]
        q = {
            "namespace": "label_values(moemesh_build_info, namespace)",
            "model": f"label_values(moemesh_router_requests_total{{{NS}}}, model)",
            "tenant": f"label_values(moemesh_router_requests_total{{{NS}}}, tenant)",
        }
        for v in self.variables:
            var = {"name": v, "label": v, "type": "query", "datasource": DS, "definition": q[v],
                   "query": {"query": q[v], "refId": v}, "refresh": 2, "sort": 1, "current": {}, "hide": 0,
                   "includeAll": v != "namespace", "multi": v != "namespace"}
            if v != "namespace":
                var["allValue"] = ".*"
            tmpl.append(var)
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["moemesh"],
            "schemaVersion": 39,
            "version": 1,
            "editable": False,
            "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "timezone": "",
            "annotations": {"list": []},
            "links": [{"title": "moemesh", "type": "dashboards", "tags": ["moemesh"], "asDropdown": True}],
            "templating": {"list": tmpl},
            "panels": self.panels,
        }


def overview():
    b = Board("moemesh-overview", "moemesh / Overview",
              "Traffic, tokens, latency (TTFT, inter-token, end-to-end), errors and saturation of a moemesh cluster.",
              ("namespace", "model"))
    sel = NS + ', model=~"$model"'
    b.row("Traffic")
    b.panel("Requests by status", [(f"sum by (status) ({rate('moemesh_router_requests_total', sel)})", "{{status}}")],
            unit="reqps")
    b.panel("Tokens per second", [(f"sum({rate('moemesh_router_prompt_tokens_total', sel)})", "prompt"),
                                  (f"sum({rate('moemesh_router_completion_tokens_total', sel)})", "completion")])
    b.panel("Error ratio (5xx / all)", [(error_ratio(sel, ""), "5xx")], unit="percentunit")
    b.panel("Finish reasons", [(f"sum by (finish_reason) ({rate('moemesh_router_requests_total', sel)})",
                                "{{finish_reason}}")], unit="reqps")
    b.row("Latency")
    b.panel("Time to first token", [(quantile(0.5, "moemesh_router_time_to_first_token_seconds"), "p50"),
                                     (quantile(0.99, "moemesh_router_time_to_first_token_seconds"), "p99"),
                                     (avg_hist("moemesh_router_time_to_first_token_seconds"), "mean")], unit="s", w=8)
    b.panel("Inter-token latency", [(quantile(0.5, "moemesh_router_inter_token_latency_seconds"), "p50"),
                                     (quantile(0.99, "moemesh_router_inter_token_latency_seconds"), "p99")], unit="s", w=8)
    b.panel("End-to-end latency", [(quantile(0.5, "moemesh_router_request_duration_seconds"), "p50"),
                                    (quantile(0.99, "moemesh_router_request_duration_seconds"), "p99")], unit="s", w=8)
    b.panel("Queue time", [(quantile(0.99, "moemesh_router_queue_time_seconds"), "p99"),
                           (avg_hist("moemesh_router_queue_time_seconds"), "mean")], unit="s", w=8)
    b.panel("Router step round trip", [(quantile(0.5, "moemesh_router_step_duration_seconds"), "p50"),
                                       (quantile(0.99, "moemesh_router_step_duration_seconds"), "p99")], unit="s", w=8)
    b.panel("Attention step phases (mean)",
            [(avg_hist("moemesh_attention_step_phase_seconds", "phase"), "{{phase}}")], unit="s", w=8, must=False,
            description="Where a step's time goes on the attention workers: attention compute, waiting for expert "
                        "hosts, sampling.")
    b.row("Saturation")
    b.panel("Requests running / waiting / preempted",
            [(f"sum(moemesh_router_requests_running{{{NS}}})", "running"),
             (f"sum(moemesh_router_requests_waiting{{{NS}}})", "waiting"),
             (f"sum(moemesh_router_requests_preempted{{{NS}}})", "preempted")], w=8)
    b.panel("Scheduler step size (tokens)", [(quantile(0.5, "moemesh_router_step_tokens"), "p50"),
                                              (avg_hist("moemesh_router_step_tokens"), "mean")], w=8)
    b.panel("Preemptions by reason", [(f"sum by (reason) ({rate('moemesh_router_preemptions_total')})", "{{reason}}")],
            unit="ops", w=8)
    b.panel("KV cache usage (attention workers)", [(f"max by (instance) (moemesh_attention_kv_usage_ratio{{{NS}}})",
                                                     "{{instance}}")], unit="percentunit", w=8, must=False)
    b.panel("CPU by service", [(f"sum by (job) ({rate('process_cpu_seconds_total')})", "{{job}}")], unit="percentunit",
            w=8)
    b.panel("Resident memory", [(f"sum by (job) (process_resident_memory_bytes{{{NS}}})", "{{job}}")], unit="bytes", w=8)
    b.row("Fleet")
    b.panel("Targets up", [(f"sum by (job) (up{{{NS}}})", "{{job}}")], kind="stat", w=8)
    b.panel("Live members (coordinator)", [(f"max by (role) (moemesh_coordinator_live_hosts{{{NS}}})", "{{role}}")],
            kind="stat", w=8)
    b.panel("Builds", [(f"count by (job, version, commit) (moemesh_build_info{{{NS}}})", "",
                        {"format": "table", "instant": True})], kind="table", w=8)
    return b


def experts():
    b = Board("moemesh-experts", "moemesh / Experts",
              "Expert load per layer x expert, imbalance, dispatch latency per expert host, replicas and the "
              "expert hosts' batching.")
    rows = f"sum by (layer, expert) ({rate('moemesh_expert_rows_total')})"
    b.row("Load")
    b.panel("Expert load heat map (rows/s, layer x expert)", [(rows, "", {"format": "table", "instant": True})],
            kind="table", w=24, h=10,
            description="Rows per second each expert computed, summed over its replicas. One row per layer, one "
                        "column per expert; a hot cell is a hot expert. See docs/operations.md.",
            transformations=[{"id": "groupingToMatrix",
                              "options": {"columnField": "expert", "rowField": "layer", "valueField": "Value"}}],
            fieldConfig={"defaults": {"unit": "short", "decimals": 1,
                                      "custom": {"cellOptions": {"type": "color-background"}},
                                      "color": {"mode": "continuous-GrYlRd"}}, "overrides": []})
    b.panel("Expert load over time (rows/s)", [(rows, "L{{layer}} E{{expert}}")], kind="heatmap", w=24, h=10,
            options={"calculate": False, "yAxis": {"axisPlacement": "left"}, "color": {"scheme": "Oranges"},
                     "cellGap": 1},
            description="Each row of the heat map is one (layer, expert); colour is its rows per second.")
    b.panel("Load imbalance (max / mean rows per expert)",
            [(f"max by (layer) (moemesh_coordinator_expert_load_imbalance_ratio{{{NS}}})", "layer {{layer}}")], w=12)
    b.panel("Load share of the hottest expert per layer",
            [(f"max by (layer) ({rows} / on (layer) group_left sum by (layer) ({rate('moemesh_expert_rows_total')}))",
              "layer {{layer}}")], unit="percentunit", w=12)
    b.row("Dispatch (attention side)")
    b.panel("Dispatch round trip p99 by host",
            [(quantile(0.99, "moemesh_attention_dispatch_round_trip_seconds", "host"), "{{host}}")], unit="s", w=8)
    b.panel("Dispatch requests by host", [(f"sum by (host) ({rate('moemesh_attention_dispatch_requests_total')})",
                                           "{{host}}")], unit="reqps", w=8)
    b.panel("Dispatch failures and failovers",
            [(f"sum by (host, reason) ({rate('moemesh_attention_dispatch_failures_total')})", "fail {{host}} {{reason}}"),
             (f"sum by (reason) ({rate('moemesh_attention_dispatch_failovers_total')})", "failover {{reason}}"),
             (f"sum by (reason) ({rate('moemesh_attention_dispatch_exhausted_total')})", "exhausted {{reason}}")],
            unit="ops", w=8)
    b.row("Placement")
    b.panel("Replicas per expert (layer x expert)",
            [(f"max by (layer, expert) (moemesh_coordinator_expert_replicas{{{NS}}})", "",
              {"format": "table", "instant": True})], kind="table", w=12, h=8,
            transformations=[{"id": "groupingToMatrix",
                              "options": {"columnField": "expert", "rowField": "layer", "valueField": "Value"}}])
    b.panel("Experts without a live host",
            [(f"max(moemesh_coordinator_uncovered_experts{{{NS}}})", "uncovered")], kind="stat", w=6)
    b.panel("Placement version", [(f"max(moemesh_coordinator_placement_version{{{NS}}})", "version")], kind="stat", w=6)
    b.panel("Placement moves by load (experts)",
            [(f"max(moemesh_coordinator_placement_moves_total{{{NS}}})", "moves")], kind="stat", w=6,
            description="Experts placed, added or dropped by measured load: a host beyond the slots gets the hottest "
                        "experts (core/eplb.h), live re-placements move them (core/live_rebalance.h).")
    b.panel("Live re-placements",
            [(f"max by (outcome) (moemesh_coordinator_rebalances_total{{{NS}}})", "{{outcome}}"),
             (f"max(moemesh_coordinator_rebalancing{{{NS}}})", "in progress")], w=6,
            description="Load-driven re-placements with --rebalance-interval-s: done, aborted (nothing changed), and "
                        "1 while one is loading, switching or dropping experts.")
    b.panel("Restarts per member (supervisor)",
            [(f"max by (host) (moemesh_coordinator_member_restarts{{{NS}}})", "{{host}}")], kind="stat", w=6,
            description="Times `moemesh up` restarted each member (MoemeshRestartLoop fires on 3 in 15 minutes).")
    b.panel("Replicas per expert: fewest / most",
            [(f"min(moemesh_coordinator_expert_replicas{{{NS}}})", "fewest"),
             (f"max(moemesh_coordinator_expert_replicas{{{NS}}})", "most")], w=6)
    b.panel("Dispatches waiting for an uncovered expert",
            [(f"sum(moemesh_attention_dispatch_waiting_calls{{{NS}}})", "waiting now"),
             (f"sum({rate('moemesh_attention_dispatch_uncovered_waits_total')})", "waits/s")], w=6,
            description="Steps whose expert has no usable host (it died, no replica left) wait for a replacement up "
                        "to --uncovered-wait-ms instead of failing.")
    b.panel("Failure detection: disconnected hosts and the adaptive deadline",
            [(f"max(moemesh_attention_dispatch_disconnected_hosts{{{NS}}})", "disconnected hosts"),
             (f"max(moemesh_attention_dispatch_deadline_seconds{{{NS}}})", "deadline (s)")], w=12,
            description="Hosts whose connection dropped are skipped until they reconnect; the deadline is a multiple "
                        "of the recent p99 round trip.")
    b.panel("Experts per host", [(f"max by (host) (moemesh_coordinator_host_experts{{{NS}}})", "{{host}}")], w=12)
    b.panel("Expert hosts live / expected",
            [(f"max(moemesh_coordinator_live_hosts{{{NS}, role=\"expert\"}})", "live"),
             (f"max(moemesh_coordinator_expected_expert_hosts{{{NS}}})", "expected")], w=12)
    b.row("Expert hosts")
    b.panel("Busy fraction by host (the autoscaling signal)",
            [(f"sum by (instance) ({rate('moemesh_expert_busy_seconds_total')})", "{{instance}}")],
            unit="percentunit", w=12,
            description="Share of wall time each expert host was computing; the chart's autoscaler holds the pool's "
                        "average at autoscaling.targetBusyFraction.")
    b.panel("Batch size (rows)", [(quantile(0.5, "moemesh_expert_batch_rows"), "p50"),
                                  (quantile(0.99, "moemesh_expert_batch_rows"), "p99")], w=8)
    b.panel("Compute latency p99 by host",
            [(quantile(0.99, "moemesh_expert_compute_seconds", "instance"), "{{instance}}")], unit="s", w=8)
    b.panel("Queue depth", [(f"sum by (instance) (moemesh_expert_queued_requests{{{NS}}})", "{{instance}}")], w=8)
    b.panel("Network bytes per second", [(f"sum by (instance) ({rate('moemesh_expert_received_bytes_total')})",
                                          "rx {{instance}}"),
                                         (f"sum by (instance) ({rate('moemesh_expert_sent_bytes_total')})",
                                          "tx {{instance}}")], unit="Bps", w=12)
    b.panel("Batch queue wait p99", [(quantile(0.99, "moemesh_expert_queue_wait_seconds"), "p99")], unit="s", w=12)
    return b


def tenants():
    b = Board("moemesh-tenants", "moemesh / Tenants",
              "Traffic, tokens, rejections and latency per tenant. Until tenants are configured every series is "
              "tenant=\"default\".", ("namespace", "tenant"))
    sel = NS + ', tenant=~"$tenant"'
    b.panel("Requests by tenant", [(f"sum by (tenant) ({rate('moemesh_router_requests_total', sel)})", "{{tenant}}")],
            unit="reqps")
    b.panel("Tokens by tenant", [(f"sum by (tenant) ({rate('moemesh_router_prompt_tokens_total', sel)})",
                                  "prompt {{tenant}}"),
                                 (f"sum by (tenant) ({rate('moemesh_router_completion_tokens_total', sel)})",
                                  "completion {{tenant}}")])
    b.panel("Rejections by tenant and reason",
            [(f"sum by (tenant, reason) ({rate('moemesh_router_rejected_requests_total', sel)})",
              "{{tenant}} {{reason}}")], unit="reqps")
    b.panel("Error ratio by tenant", [(error_ratio(sel, "by (tenant) "), "{{tenant}}")], unit="percentunit")
    b.panel("Time to first token p99 by tenant",
            [(quantile(0.99, "moemesh_router_time_to_first_token_seconds", "tenant", sel), "{{tenant}}")], unit="s",
            w=8)
    b.panel("Inter-token latency p99 by tenant",
            [(quantile(0.99, "moemesh_router_inter_token_latency_seconds", "tenant", sel), "{{tenant}}")], unit="s",
            w=8)
    b.panel("End-to-end latency p99 by tenant",
            [(quantile(0.99, "moemesh_router_request_duration_seconds", "tenant", sel), "{{tenant}}")], unit="s", w=8)
    b.panel("Queue time p99 by tenant",
            [(quantile(0.99, "moemesh_router_queue_time_seconds", "tenant", sel), "{{tenant}}")], unit="s", w=12)
    b.panel("Requests by tenant and status",
            [(f"sum by (tenant, status) ({rate('moemesh_router_requests_total', sel)})", "{{tenant}} {{status}}")],
            unit="reqps", w=12)
    return b


def kv_cache():
    b = Board("moemesh-kv-cache", "moemesh / KV cache",
              "KV cache usage on the attention workers, the prefix cache (KV store) hit rate, evictions and "
              "preemptions.")
    b.row("Attention workers")
    b.panel("KV cache usage", [(f"max by (instance) (moemesh_attention_kv_usage_ratio{{{NS}}})", "{{instance}}")],
            unit="percentunit", must=False)
    b.panel("KV blocks used / free", [(f"sum by (state) (moemesh_attention_kv_blocks{{{NS}}})", "{{state}}")],
            must=False)
    b.panel("Prefix cache hit rate (tokens)",
            [(f"sum({rate('moemesh_attention_prefix_cache_hit_tokens_total')}) / "
              f"sum({rate('moemesh_attention_prefix_cache_query_tokens_total')})", "hit rate")], unit="percentunit")
    b.panel("Prefill tokens computed / restored",
            [(f"sum({rate('moemesh_attention_prefill_tokens_computed_total')})", "computed"),
             (f"sum({rate('moemesh_attention_prefix_cache_hit_tokens_total')})", "restored from KV store")])
    b.panel("Preemptions by reason", [(f"sum by (reason) ({rate('moemesh_router_preemptions_total')})", "{{reason}}")],
            unit="ops")
    b.panel("Prefix cache memory tier (bytes held)",
            [(f"sum by (instance) (moemesh_attention_prefix_cache_memory_bytes{{{NS}}})", "{{instance}}")],
            unit="bytes", must=False, description="Blocks each worker keeps in memory in front of the KV store "
                                                  "(--local-prefix-cache-mb); 0 when the tier is off.")
    b.panel("Prefix blocks served from memory vs the KV store",
            [(f"sum({rate('moemesh_attention_prefix_cache_memory_hit_blocks_total')})", "memory tier"),
             (f"sum({rate('moemesh_kvstore_hits_total')})", "KV store")],
            unit="ops", must=False, description="Where restored prefix blocks came from. Prefix affinity in the "
                                                "router keeps the memory share high.")
    b.panel("KV store request failures, and lookups cut by the wait budget",
            [(f"sum by (op) ({rate('moemesh_attention_kvstore_failures_total')})", "failed {{op}}"),
             (f"sum({rate('moemesh_attention_prefix_cache_cut_lookups_total')})", "cut by the wait budget")],
            unit="ops", description="Failures back the worker off the store for a while; a cut lookup is one "
                                    "the step stopped waiting for because computing its positions was quicker "
                                    "(the store is slow, not down).")
    b.row("KV store")
    # The tiered series (memory; disk with --disk-budget-bytes) are kept apart: a block promoted
    # from disk is held by both tiers, so summing bytes or blocks over them would count it twice.
    b.panel("KV store usage by tier (bytes / budget)",
            [(f"sum by (tier) (moemesh_kvstore_bytes{{{NS}}}) / sum by (tier) (moemesh_kvstore_budget_bytes{{{NS}}})",
              "{{tier}}")],
            unit="percentunit", w=8)
    b.panel("KV store blocks", [(f"sum by (instance, tier) (moemesh_kvstore_blocks{{{NS}}})", "{{instance}} {{tier}}")],
            w=8)
    b.panel("KV store hit ratio (blocks)",
            [(f"sum({rate('moemesh_kvstore_hits_total')}) / (sum({rate('moemesh_kvstore_hits_total')}) + "
              f"sum({rate('moemesh_kvstore_misses_total')}))", "hits")], unit="percentunit", w=8)
    b.panel("KV store hits by tier", [(f"sum by (tier) ({rate('moemesh_kvstore_hits_total')})", "{{tier}}")],
            unit="ops", w=8)
    b.panel("Evictions by tier", [(f"sum by (tier) ({rate('moemesh_kvstore_evictions_total')})", "{{tier}}")],
            unit="ops", w=8)
    b.panel("KV store disk errors", [(f"sum by (reason) ({rate('moemesh_kvstore_disk_errors_total')})", "{{reason}}")],
            unit="ops", w=8, must=False, description="Disk tier files deleted as bad (bad_header, checksum) or "
                                                     "failed writes and reads (io). Empty without errors.")
    b.panel("Puts by result", [(f"sum by (result) ({rate('moemesh_kvstore_put_blocks_total')})", "{{result}}")],
            unit="ops", w=8)
    b.panel("Put / get latency p99", [(quantile(0.99, "moemesh_kvstore_put_duration_seconds"), "put"),
                                       (quantile(0.99, "moemesh_kvstore_get_duration_seconds"), "get")], unit="s", w=8)
    return b


BOARDS = {"overview": overview, "experts": experts, "tenants": tenants, "kv-cache": kv_cache}


def render():
    return {name: json.dumps(make().json(), indent=2) + "\n" for name, make in BOARDS.items()}


def must_have_data():
    """{dashboard uid: [panel titles]}"""
    out = {}
    for make in BOARDS.values():
        b = make()
        out[b.uid] = list(b.must)
    return out


def lint(folder):
    """What Grafana provisioning and the chart need of every dashboards/*.json (generated or not)."""
    problems, uids = [], set()
    for fn in sorted(f for f in os.listdir(folder) if f.endswith(".json")):
        d = json.load(open(os.path.join(folder, fn)))
        if d.get("schemaVersion") != 39:
            problems.append(f"{fn}: schemaVersion {d.get('schemaVersion')}, expected 39")
        if not d.get("uid") or d["uid"] in uids:
            problems.append(f"{fn}: missing or duplicate uid")
        uids.add(d.get("uid"))
        names = [v.get("name") for v in d.get("templating", {}).get("list", [])]
        if "datasource" not in names:
            problems.append(f"{fn}: no datasource variable")
        for p in d.get("panels", []):
            for obj in [p] + p.get("targets", []):
                ds = obj.get("datasource")
                if ds is not None and ds.get("uid") != "${datasource}":
                    problems.append(f"{fn}: panel {p.get('title')!r} names datasource uid {ds.get('uid')!r}")
    return problems


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--check")
    a = p.parse_args()
    files = render()
    if a.out:
        for name, text in files.items():
            with open(os.path.join(a.out, f"{name}.json"), "w") as f:
                f.write(text)
        return 0
    if a.check:
        bad = [n for n, t in files.items()
               if not os.path.exists(os.path.join(a.check, f"{n}.json")) or open(os.path.join(a.check, f"{n}.json")).read() != t]
        if bad:
            print(f"FAIL: dashboards out of date: {bad}; run tests/observability/make_dashboards.py --out dashboards")
            return 1
        problems = lint(a.check)
        if problems:
            print("FAIL:\n  " + "\n  ".join(problems))
            return 1
        print(f"PASS: {len(files)} dashboards match their source")
        return 0
    p.error("--out or --check")


if __name__ == "__main__":
    sys.exit(main())
