#!/usr/bin/env python3
"""Every dashboard query and every rule against a real Prometheus scraping a real cluster.

Starts a cluster (router with two tenants, 1 attention worker, 2 expert hosts, KV store) and Debian's
/usr/bin/prometheus (loopback only, temporary TSDB, scrape interval 1 s, one job per service,
namespace="moemesh-test" on every target, the rule files of dashboards/rules loaded), keeps
traffic from both tenants flowing, then through the HTTP API (/api/v1/query):

  - every template variable query (label_values) of every dashboard returns its values;
  - every PromQL expression of every dashboard panel (with $__rate_interval, $namespace, $model,
    $tenant substituted) is valid, and the panels marked must-have-data (make_dashboards.py)
    return at least one non-NaN sample -- unless they read a metric the contract still lists as
    `planned` (reported as pending);
  - every recording and alert rule expression is valid, and Prometheus itself loaded and
    evaluated every rule without error; every target is up;
  - the per-tenant router series exist for both tenants.

  test_prometheus.py --cli build/services/cli/moemesh --source-dir . [--prometheus P]
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_dashboards  # noqa: E402
from obs_cluster import (PROMPTS, Cluster, TestFailure, free_port, http, load_contract, log, run_main,  # noqa: E402
                         write_tenants)

NAMESPACE = "moemesh-test"
TENANTS = {"alpha": "key-alpha", "beta": "key-beta"}  # name: API key
# Router series that must carry each tenant's own label value under traffic.
PER_TENANT = ["moemesh_router_requests_total", "moemesh_router_prompt_tokens_total",
              "moemesh_router_completion_tokens_total", "moemesh_router_time_to_first_token_seconds_count"]
RATE_INTERVAL = "20s"  # Grafana's $__rate_interval is at least 4 scrape intervals; 20 s spans several steps


def rule_exprs(path):
    """[(name, expr)] of a Prometheus rule file."""
    try:
        import yaml
    except ImportError:
        yaml = None
    text = open(path, encoding="utf-8").read()
    out = []
    if yaml:
        for g in yaml.safe_load(text)["groups"]:
            for r in g["rules"]:
                out.append((r.get("record") or r.get("alert"), str(r["expr"])))
        return out
    # Without PyYAML: `- record|alert: NAME` then `expr: ONE LINE` or `expr: |` + an indented block.
    lines = text.splitlines()
    name = None
    i = 0
    while i < len(lines):
        m = re.match(r"\s*-\s*(record|alert):\s*(\S+)", lines[i])
        if m:
            name = m.group(2)
        m = re.match(r"(\s*)expr:\s*(.*)$", lines[i])
        if m:
            if m.group(2).strip() in ("|", ">"):
                indent, block = len(m.group(1)), []
                while i + 1 < len(lines) and (not lines[i + 1].strip() or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                    i += 1
                    block.append(lines[i].strip())
                out.append((name, " ".join(block)))
            else:
                out.append((name, m.group(2).strip().strip("'\"")))
        i += 1
    return out


class Prometheus:
    def __init__(self, binary, tmp, services, rule_files):
        self.port = free_port()
        cfg = os.path.join(tmp, "prometheus.yml")
        jobs = {}
        for name, addr in services.items():
            jobs.setdefault("moemesh-" + Cluster.service_of(name), []).append(addr)
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n")
            f.write("rule_files:\n" + "".join(f"  - {json.dumps(r)}\n" for r in rule_files))
            f.write("scrape_configs:\n")
            for job, targets in sorted(jobs.items()):
                f.write(f"  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(targets)}\n"
                        f"        labels: {{namespace: {NAMESPACE}}}\n")
        self.log_path = os.path.join(tmp, "prometheus.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestFailure(f"prometheus exited {self.proc.returncode}:\n{open(self.log_path).read()}")
            try:
                if http(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)[0] == 200:
                    log(f"prometheus ready on 127.0.0.1:{self.port}, jobs {sorted(jobs)}")
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TestFailure("prometheus not ready within 30 s:\n" + open(self.log_path).read())

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params, doseq=True)
        status, body = http(url, timeout=10)
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {status}: {body[:200]!r}"}

    def query(self, expr):
        return self.api("query", query=expr)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


class Traffic(threading.Thread):
    """Completions back to back until stopped (so rates and quantiles have recent samples), the
    tenants' API keys taking turns."""

    def __init__(self, cluster, keys):
        super().__init__(daemon=True)
        self.cluster, self.keys, self.stop_flag, self.answered, self.errors = cluster, keys, threading.Event(), 0, []

    def run(self):
        i = 0
        while not self.stop_flag.is_set():
            p = PROMPTS[i % len(PROMPTS)] * (1 + i % 3)
            status, body = http(self.cluster.api("/v1/completions"),
                                {"prompt": p, "max_tokens": 8, "temperature": 0.9, "seed": i},
                                headers={"Authorization": f"Bearer {self.keys[i % len(self.keys)]}"})
            if status == 200:
                self.answered += 1
            else:
                self.errors.append(f"{status}: {body[:200]!r}")
            i += 1


def substitute(expr, variables):
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in expr:
        raise TestFailure(f"unsubstituted variable in {expr}")
    return expr


def has_data(result):
    data = result.get("data", {})
    samples = data.get("result", [])
    if data.get("resultType") == "scalar":
        samples = [{"value": samples}]
    return any(not math.isnan(float(s["value"][1])) for s in samples if "value" in s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cli", required=True)
    p.add_argument("--source-dir", required=True)
    p.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    p.add_argument("--warmup", type=float, default=12.0, help="seconds of traffic before the queries")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    t0 = time.monotonic()
    src = os.path.abspath(args.source_dir)
    contract = load_contract(os.path.join(src, "docs", "metrics.md"))
    planned = {m for m, c in contract.items() if c["status"] == "planned"}
    dash_dir = os.path.join(src, "dashboards")
    rules_dir = os.path.join(dash_dir, "rules")
    rule_files = sorted(os.path.join(rules_dir, f) for f in os.listdir(rules_dir) if f.endswith((".yaml", ".yml")))
    boards = {f: json.load(open(os.path.join(dash_dir, f))) for f in sorted(os.listdir(dash_dir)) if f.endswith(".json")}
    must = make_dashboards.must_have_data()

    checked = 0
    pending = set()

    def body(tmp, problems):
        nonlocal checked
        prom = traffic = None
        tenants = os.path.join(tmp, "tenants.json")
        write_tenants(tenants, args.cli, TENANTS)
        try:
            with Cluster(args.cli, tmp, attention=1, experts=2, tenants=tenants) as cluster:
                prom = Prometheus(args.prometheus, tmp, cluster.services, rule_files)
                traffic = Traffic(cluster, list(TENANTS.values()))
                traffic.start()
                time.sleep(args.warmup)
                if traffic.errors:
                    problems.append(f"traffic errors: {traffic.errors[:3]}")
                log(f"{traffic.answered} completions so far; evaluating queries")

                targets = prom.api("targets").get("data", {}).get("activeTargets", [])
                down = [f"{t['labels'].get('job')} {t['scrapeUrl']}: {t.get('lastError')}" for t in targets
                        if t["health"] != "up"]
                if len(targets) != len(cluster.services) or down:
                    problems.append(f"targets: {len(targets)} for {len(cluster.services)} services, not up: {down}")
                checked += check_tenant_series(prom, problems)
                checked += check_queries(prom, boards, rule_files, must, planned, problems, pending)
                traffic.stop_flag.set()
                traffic.join(30)
        finally:
            if traffic:
                traffic.stop_flag.set()
            if prom:
                prom.stop()

    rc = run_main(body, "moemesh-obs-prom-", "every dashboard query and rule is valid; must-have-data panels have "
                  "data; both tenants have their own series", args.keep)
    for p_ in sorted(pending):
        log(f"pending: {p_}")
    log(f"{checked} queries evaluated in {time.monotonic() - t0:.1f} s")
    return rc


def check_tenant_series(prom, problems):
    """Each configured tenant has its own value of the router's per-tenant series."""
    for metric in PER_TENANT:
        r = prom.query(f'sum by (tenant) ({metric}{{namespace="{NAMESPACE}"}}) > 0')
        seen = {s["metric"].get("tenant") for s in r.get("data", {}).get("result", [])}
        if r.get("status") != "success" or not set(TENANTS) <= seen:
            problems.append(f"{metric}: tenants with data {sorted(t for t in seen if t)}, expected {sorted(TENANTS)}")
    return len(PER_TENANT)


def check_queries(prom, boards, rule_files, must, planned, problems, pending):
    """Every template variable, panel expression and rule against Prometheus; returns how many."""
    checked = 0
    variables = {"namespace": NAMESPACE, "model": ".*", "tenant": ".*", "datasource": "prometheus"}
    for fn, board in boards.items():
        uid = board.get("uid")
        # Template variables: the label_values queries Grafana would run.
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var["query"]["query"] if isinstance(var.get("query"), dict) else var.get("query", "")
            m = re.match(r"label_values\((.*),\s*(\w+)\)$", substitute(q, variables))
            if not m:
                problems.append(f"{fn}: variable {var['name']}: cannot read {q!r}")
                continue
            values = prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)}).get("data") or []
            checked += 1
            if not values:
                problems.append(f"{fn}: variable {var['name']} ({q}) has no values")
        for panel in board.get("panels", []):
            for tgt in panel.get("targets", []):
                expr = substitute(tgt["expr"], variables)
                r = prom.query(expr)
                checked += 1
                where = f"{fn} / {panel['title']} / {tgt['refId']}"
                if r.get("status") != "success":
                    problems.append(f"{where}: invalid: {r.get('error')} in {expr}")
                    continue
                if panel["title"] not in must.get(uid, []):
                    continue
                reads_planned = sorted(m for m in planned if re.search(rf"\b{m}(_bucket|_sum|_count)?\b", expr))
                if reads_planned:
                    pending.add(f"{where} (reads planned {', '.join(reads_planned)})")
                elif not has_data(r):
                    problems.append(f"{where}: no data under traffic: {expr}")

    for path in rule_files:
        for name, expr in rule_exprs(path):
            r = prom.query(expr)
            checked += 1
            if r.get("status") != "success":
                problems.append(f"{os.path.basename(path)} / {name}: invalid: {r.get('error')}")
    # Prometheus evaluated the loaded rules itself (the recording group every 30 s: wait for one round).
    deadline = time.monotonic() + 35
    while True:
        groups = prom.api("rules").get("data", {}).get("groups", [])
        rules = [r for g in groups for r in g["rules"]]
        unevaluated = [r["name"] for r in rules if r.get("lastEvaluation", "").startswith("0001-")]
        if not unevaluated or time.monotonic() > deadline:
            break
        time.sleep(1)
    loaded = sum(len(rule_exprs(p)) for p in rule_files)
    if len(rules) != loaded:
        problems.append(f"prometheus loaded {len(rules)} rules, the files have {loaded}")
    for r in rules:
        if r.get("health") == "err" or r.get("lastError"):
            problems.append(f"rule {r['name']}: {r.get('lastError')}")
    if unevaluated:
        problems.append(f"rules never evaluated: {unevaluated}")
    return checked


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TestFailure as e:
        print(f"FAIL: {e}")
        sys.exit(1)
