#!/usr/bin/python3
"""Offline tests of the Helm chart helm/moemesh with the real Helm binary.

    check_chart.py --helm HELM [--tools DIR] [--promtool PROMTOOL] GROUP

GROUP:
  render      helm lint --strict per values file; helm template per variant (default, CPU-only,
              GPU, several expert pools, autoscaling with KEDA / an HPA / neither, no monitoring
              CRDs) and checks on the rendered objects; values that must fail (schema, template).
  schemas     the rendered objects of every variant against the Kubernetes, prometheus-operator
              and KEDA JSON schemas (kubernetes-models from .cache/chart-tools, offline).
  dockerfiles deploy/Dockerfile* through dockerfile-utils lint (from .cache/chart-tools).
Ends with "N passed, N failed".
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHART = os.path.join(REPO, "helm", "moemesh")
DASHBOARDS = os.path.join(REPO, "dashboards")
VALUES = os.path.join(HERE, "values")
BAD = os.path.join(HERE, "bad")
NAMESPACE = "llm"
RELEASE = "mm"
KUBE_VERSION = "1.30.0"
MON, KEDA, CUSTOM = "monitoring.coreos.com/v1", "keda.sh/v1alpha1", "custom.metrics.k8s.io/v1beta1"

# name -> values files, extra API versions, expected router --expert-hosts, expected autoscalers
# per pool ("keda", "hpa" or None), accelerator, tenants configured.
# autoscaling.yaml: "hot" scales on the busy fraction (the default signal), "layer1" on queued requests.
AUTOSCALING = dict(signals={"layer1": "queued"}, thresholds={"hot": "0.6", "layer1": "8"})

VARIANTS = {
    "default": dict(values=[], apis=[MON], hosts=2, scalers={"default": None}),
    "default-no-crds": dict(values=[], apis=[], hosts=2, scalers={"default": None}),
    "cpu": dict(values=["cpu.yaml"], apis=[MON], hosts=3, scalers={"default": None}, tenants=True,
                lora={"modules": ["support=/models/adapters/support"], "cache_mb": "128"}),
    "gpu": dict(values=["gpu.yaml"], apis=[MON], hosts=4, scalers={"default": None}, tenants=True, gpu=True),
    "pools": dict(values=["pools.yaml"], apis=[MON], hosts=5, scalers={"big": None, "small": None, "layer0": None}),
    "autoscaling-keda": dict(values=["autoscaling.yaml"], apis=[MON, KEDA], hosts=5,
                             scalers={"hot": "keda", "layer1": "hpa", "fixed": None}, **AUTOSCALING),
    "autoscaling-hpa": dict(values=["autoscaling.yaml"], apis=[MON, CUSTOM], hosts=5,
                            scalers={"hot": "hpa", "layer1": "hpa", "fixed": None}, **AUTOSCALING),
    "autoscaling-none": dict(values=["autoscaling.yaml"], apis=[MON], hosts=5,
                             scalers={"hot": None, "layer1": "hpa", "fixed": None}, **AUTOSCALING),
    "kvstore-memory-only": dict(values=["kvstore-memory-only.yaml"], apis=[MON], hosts=2, scalers={"default": None}),
}

# bad/FILE -> the values path the schema error must name.
BAD_VALUES = {
    "wrong-type.yaml": "/attention/replicas",
    "bad-accelerator.yaml": "/accelerator",
    "bad-pool-name.yaml": "/expert/pools/0/name",
    "misspelt-key.yaml": "/router",
    "bad-quantity.yaml": "/kvstore/resources/limits/memory",
    "bad-experts.yaml": "/expert/pools/0/experts",
    "bad-disk-budget.yaml": "/kvstore/persistence/budgetBytes",
    "bad-trace-ratio.yaml": "/router/traceSampleRatio",
}

# --set values that the templates themselves must refuse, with a part of the message.
BAD_SETS = [
    (["expert.poolDefaults.autoscaling.enabled=true", "expert.poolDefaults.autoscaling.provider=keda"],
     "no keda.sh/v1alpha1 API"),
    (["model.source=objectStorage"], "set model.objectStorage.uri"),
    (["router.expertReplicas=3"], "router.expertReplicas (3) is more than the expert hosts"),
    (["expert.pools[0].name=a", "expert.pools[1].name=a"], 'the pool name "a" is used twice'),
]


class Failure(Exception):
    pass


def ensure(cond, msg):
    if not cond:
        raise Failure(msg)


class Runner:
    def __init__(self, args):
        self.args = args
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.rendered = {}

    def check(self, name, fn, *a):
        try:
            fn(*a)
        except Failure as e:
            self.failed += 1
            print(f"FAIL {name}: {e}")
            return
        except Exception:
            self.failed += 1
            print(f"FAIL {name}: exception\n{traceback.format_exc()}")
            return
        self.passed += 1
        print(f"ok   {name}")

    def skip(self, name, why):
        self.skipped += 1
        print(f"skip {name}: {why}")

    # ---- helm ---------------------------------------------------------------------------------
    def helm(self, *argv):
        return subprocess.run([self.args.helm, *argv], capture_output=True, text=True, timeout=60)

    def template(self, values=(), apis=(), sets=()):
        argv = ["template", RELEASE, CHART, "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
        for v in values:
            argv += ["-f", v]
        for a in apis:
            argv += ["--api-versions", a]
        for s in sets:
            argv += ["--set", s]
        return self.helm(*argv)

    def render(self, name):
        if name not in self.rendered:
            v = VARIANTS[name]
            r = self.template([os.path.join(VALUES, f) for f in v["values"]], v["apis"])
            if r.returncode != 0:
                raise Failure(f"helm template failed:\n{r.stderr}")
            docs = [d for d in yaml.safe_load_all(r.stdout) if d]
            self.rendered[name] = docs
        return self.rendered[name]


# ---- helpers over rendered objects ------------------------------------------------------------
def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def flag(args, name):
    vals = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    return vals[0] if vals else None


def main_container(w):
    return w["spec"]["template"]["spec"]["containers"][0]


def pool_of(w):
    return w["spec"]["template"]["metadata"]["labels"].get("moemesh.io/pool")


# ---- checks on one variant ----------------------------------------------------------------------
def check_containers(docs):
    ws = workloads(docs)
    ensure(len(ws) >= 3, f"only {len(ws)} workloads")
    for w in ws:
        pod = w["spec"]["template"]["spec"]
        name = f'{w["kind"]}/{w["metadata"]["name"]}'
        ensure(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pod not runAsNonRoot")
        for c in pod.get("initContainers", []) + pod["containers"]:
            cn = f'{name} container {c["name"]}'
            res = c.get("resources", {})
            ensure(res.get("requests") and res.get("limits"), f"{cn}: resources need requests and limits: {res}")
            ensure("memory" in res["limits"], f"{cn}: no memory limit")
            sc = c.get("securityContext", {})
            ensure(sc.get("readOnlyRootFilesystem") is True, f"{cn}: root filesystem not read-only")
            ensure(sc.get("allowPrivilegeEscalation") is False, f"{cn}: privilege escalation allowed")
            ensure("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cn}: capabilities not dropped")
        for c in pod["containers"]:
            cn = f'{name} container {c["name"]}'
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            ensure("metrics" in ports, f"{cn}: no metrics port")
            for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                p = c.get(probe)
                ensure(p, f"{cn}: no {probe}")
                ensure(p["httpGet"]["path"] == path and p["httpGet"]["port"] == "metrics",
                       f"{cn}: {probe} must GET {path} on the metrics port: {p}")
            ensure(c["args"][0] in ("router", "attention", "expert", "kvstore"), f"{cn}: first arg {c['args'][0]}")
            ensure(flag(c["args"], "--admin-port") == str(ports["metrics"]), f"{cn}: --admin-port is not the metrics port")
            ensure(flag(c["args"], "--instance") == "$(POD_NAME)", f"{cn}: --instance is not the pod name")
            envs = {e["name"] for e in c.get("env", [])}
            ensure({"POD_NAME", "POD_NAMESPACE"} <= envs, f"{cn}: POD_NAME/POD_NAMESPACE missing")


def check_pdb_and_spread(docs):
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        name = w["metadata"]["name"]
        ensure(matches(w["spec"]["selector"]["matchLabels"], labels), f"{name}: selector does not match its pods")
        ensure(any(matches(p["spec"]["selector"]["matchLabels"], labels) for p in pdbs), f"{name}: no PodDisruptionBudget")
        tsc = w["spec"]["template"]["spec"].get("topologySpreadConstraints")
        ensure(tsc, f"{name}: no topologySpreadConstraints")
        ensure(all(matches(t["labelSelector"]["matchLabels"], labels) for t in tsc), f"{name}: spread selector misses its pods")
        others = [o for o in workloads(docs) if o is not w]
        for o in others:  # a workload's selector must not catch another workload's pods
            ensure(not matches(w["spec"]["selector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"]),
                   f"{name}: its selector also matches {o['metadata']['name']}")


def check_scraped(docs, with_crds):
    services = of_kind(docs, "Service")
    monitors = of_kind(docs, "ServiceMonitor")
    if not with_crds:
        ensure(not monitors and not of_kind(docs, "PrometheusRule"), "CRD objects rendered without the CRD API")
        for w in workloads(docs):
            ann = w["spec"]["template"]["metadata"].get("annotations", {})
            port = str(next(p["containerPort"] for p in main_container(w)["ports"] if p["name"] == "metrics"))
            ensure(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == port,
                   f"{w['metadata']['name']}: no prometheus.io annotations")
        return
    for w in workloads(docs):
        labels = w["spec"]["template"]["metadata"]["labels"]
        name = w["metadata"]["name"]
        svcs = [s for s in services if matches(s["spec"]["selector"], labels)
                and any(p["name"] == "metrics" and p["targetPort"] == "metrics" for p in s["spec"]["ports"])]
        ensure(svcs, f"{name}: no Service exposes its metrics port")
        scraped = [m for s in svcs for m in monitors
                   if matches(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
                   and NAMESPACE in m["spec"]["namespaceSelector"]["matchNames"]
                   and any(e["port"] == "metrics" and e.get("path", "/metrics") == "/metrics" for e in m["spec"]["endpoints"])]
        ensure(scraped, f"{name}: no ServiceMonitor scrapes it")
    for m in monitors:
        ensure(any(matches(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"]) for s in services),
               f"ServiceMonitor {m['metadata']['name']} selects no Service")


def check_endpoints(docs):
    """Every advertised endpoint is POD.SERVICE.NAMESPACE of a headless Service that publishes
    not-ready addresses; every peer endpoint names a Service that exists."""
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    for w in workloads(docs):
        args = main_container(w)["args"]
        adv = flag(args, "--advertise")
        if w["kind"] == "StatefulSet":
            ensure(adv, f"{w['metadata']['name']}: no --advertise")
            m = re.fullmatch(r"tcp://\$\(POD_NAME\)\.([a-z0-9-]+)\.\$\(POD_NAMESPACE\)\.svc\.cluster\.local:(\d+)", adv)
            ensure(m, f"{w['metadata']['name']}: --advertise {adv}")
            svc = services.get(m.group(1))
            ensure(svc and svc["spec"].get("clusterIP") == "None", f"{adv}: no headless Service {m.group(1)}")
            ensure(m.group(1) == w["spec"]["serviceName"], f"{adv}: not the StatefulSet's serviceName")
            ensure(svc["spec"].get("publishNotReadyAddresses") is True, f"{m.group(1)}: not-ready pods unresolvable")
            ensure(int(m.group(2)) in [p["port"] for p in svc["spec"]["ports"]], f"{adv}: port not on the Service")
            listen = flag(args, "--listen")
            ensure(listen == f"tcp://0.0.0.0:{m.group(2)}", f"{w['metadata']['name']}: --listen {listen}")
        if w["kind"] == "Deployment":
            continue  # the router binds --control and --placement
        for f in ("--router", "--placement", "--kvstore"):
            ep = flag(args, f)
            if not ep:
                continue
            m = re.fullmatch(rf"tcp://(?:([a-z0-9-]+)-\d+\.)?([a-z0-9-]+)\.{NAMESPACE}\.svc\.cluster\.local:(\d+)", ep)
            ensure(m, f"{w['metadata']['name']}: {f}={ep}")
            svc = services.get(m.group(2))
            ensure(svc, f"{w['metadata']['name']}: {f}={ep}: no Service {m.group(2)}")
            ensure(int(m.group(3)) in [p["port"] for p in svc["spec"]["ports"]], f"{f}={ep}: port not on the Service")
            ensure(svc["spec"].get("publishNotReadyAddresses") is True, f"{f}={ep}: unreachable before the peer is ready")


def check_router(docs, hosts, tenants):
    routers = [w for w in workloads(docs) if main_container(w)["args"][0] == "router"]
    ensure(len(routers) == 1 and routers[0]["kind"] == "Deployment", "one router Deployment")
    r = routers[0]
    ensure(r["spec"]["replicas"] == 1 and r["spec"]["strategy"]["type"] == "Recreate", "one coordinator, Recreate")
    c = main_container(r)
    ensure(flag(c["args"], "--expert-hosts") == str(hosts), f"--expert-hosts={flag(c['args'], '--expert-hosts')}, want {hosts}")
    ensure(flag(c["args"], "--port") == "8000", "API port 8000")
    ensure(flag(c["args"], "--trace-sample-ratio") == "1", f"--trace-sample-ratio={flag(c['args'], '--trace-sample-ratio')}")
    api = [s for s in of_kind(docs, "Service") if matches(s["spec"]["selector"], r["spec"]["template"]["metadata"]["labels"])
           and any(p["name"] == "http" for p in s["spec"]["ports"])]
    ensure(api and all(p["name"] == "http" for p in api[0]["spec"]["ports"]), "the API Service exposes only http")
    pod = r["spec"]["template"]["spec"]
    if tenants:
        ensure(flag(c["args"], "--tenants") == "/etc/moemesh/tenants", "--tenants flag")
        vol = next(v for v in pod["volumes"] if v["name"] == "tenants")
        ensure(vol["secret"]["items"][0]["path"] == "tenants", "Secret key mounted as the file tenants")
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tenants")
        ensure(mount["mountPath"] == "/etc/moemesh" and mount["readOnly"], "tenants mounted read-only at /etc/moemesh")
        secret = vol["secret"]["secretName"]
        made = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == secret]
        ensure(made or secret == "moemesh-tenants", f"Secret {secret} neither made nor existing")
        if made:
            ensure(vol["secret"]["items"][0]["key"] in made[0]["stringData"], "Secret lacks the key")
            ensure("checksum/tenants" in r["spec"]["template"]["metadata"]["annotations"], "no checksum annotation")
    else:
        ensure(not any(a.startswith("--tenants") for a in c["args"]), "--tenants without tenants")
        ensure(not any(v["name"] == "tenants" for v in pod["volumes"]), "tenants volume without tenants")


def check_lora(docs, lora):
    """The router serves lora.modules from the model volume; every attention worker and expert host
    gets lora.cacheMb."""
    want = lora or {"modules": [], "cache_mb": "256"}
    for w in workloads(docs):
        c = main_container(w)
        role = c["args"][0]
        if role == "router":
            got = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--lora-modules=")]
            ensure(got == want["modules"], f"router --lora-modules {got}, want {want['modules']}")
            ensure("--allow-runtime-lora" not in c["args"], "runtime LoRA loading on by default")
        elif role in ("attention", "expert"):
            ensure(flag(c["args"], "--lora-cache-mb") == want["cache_mb"],
                   f"{w['metadata']['name']}: --lora-cache-mb={flag(c['args'], '--lora-cache-mb')}, want {want['cache_mb']}")


def check_accelerator(docs, gpu):
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        c = main_container(w)
        res = c["resources"]
        role = c["args"][0]
        name = w["metadata"]["name"]
        ensure("nvidia.com/gpu" not in res.get("requests", {}), f"{name}: GPUs belong in limits only")
        has_shm = any(v["name"] == "dshm" for v in pod["volumes"])
        if gpu and role in ("attention", "expert"):
            ensure(int(res["limits"].get("nvidia.com/gpu", 0)) >= 1, f"{name}: no nvidia.com/gpu limit")
            ensure(c["image"].endswith("-cuda"), f"{name}: image {c['image']}")
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            ensure(shm["emptyDir"]["medium"] == "Memory", f"{name}: /dev/shm not memory-backed")
            ensure(any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"]), f"{name}: /dev/shm not mounted")
            ensure(pod.get("runtimeClassName") == "nvidia", f"{name}: runtimeClassName")
            ensure(any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{name}: no GPU toleration")
        else:
            ensure("nvidia.com/gpu" not in res.get("limits", {}), f"{name}: GPU on a CPU pod")
            ensure(not has_shm, f"{name}: /dev/shm volume without GPUs")
            # One image for the release: the CUDA one when accelerator is nvidia.
            ensure(c["image"].endswith("-cuda" if gpu else "-cpu"), f"{name}: image {c['image']}")


def check_autoscaling(docs, scalers, signals, thresholds):
    sts = {pool_of(w): w for w in of_kind(docs, "StatefulSet") if main_container(w)["args"][0] == "expert"}
    ensure(set(sts) == set(scalers), f"pools {sorted(sts)}, want {sorted(scalers)}")
    keda = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject")}
    hpa = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "HorizontalPodAutoscaler")}
    for pool, want in scalers.items():
        w = sts[pool]
        name = w["metadata"]["name"]
        got = "keda" if name in keda else "hpa" if name in hpa else None
        ensure(got == want, f"pool {pool}: autoscaler {got}, want {want}")
        if want == "keda":
            t = keda[name]["spec"]["triggers"][0]
            signal = signals.get(pool, "busy")
            series = {"busy": "rate(moemesh_expert_busy_seconds_total", "queued": "moemesh_expert_queued_requests"}[signal]
            ensure(t["type"] == "prometheus" and series in t["metadata"]["query"], f"pool {pool}: trigger {t}")
            ensure(t["metricType"] == ("Value" if signal == "busy" else "AverageValue"), f"pool {pool}: {t['metricType']}")
            ensure(t["metadata"]["threshold"] == thresholds[pool], f"pool {pool}: threshold {t['metadata']['threshold']}")
            ensure(f'pod=~"{name}-[0-9]+"' in t["metadata"]["query"], f"pool {pool}: query not limited to the pool")
            ensure(keda[name]["spec"]["scaleTargetRef"]["kind"] == "StatefulSet", "ScaledObject targets the StatefulSet")
        if want == "hpa":
            h = hpa[name]
            ensure(h["apiVersion"] == "autoscaling/v2", "HPA autoscaling/v2")
            want_metric = {"busy": "moemesh_expert_busy_fraction", "queued": "moemesh_expert_queued_requests"}
            got_metric = h["spec"]["metrics"][0]["pods"]["metric"]["name"]
            ensure(got_metric == want_metric[signals.get(pool, "busy")], f"pool {pool}: HPA metric {got_metric}")
            ensure(h["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == thresholds[pool], f"pool {pool}: HPA target")
        ensure(w["spec"].get("replicas") is not None, f"pool {pool}: no replicas at install")


def check_dashboards_and_rules(docs, with_crds):
    """Every file of dashboards/ is in the chart's output: *.json in a ConfigMap for Grafana's
    sidecar (content byte for byte), rules/*.yaml in the PrometheusRule (every group)."""
    cms = [c for c in of_kind(docs, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    shipped = {}
    for c in cms:
        for k, v in c["data"].items():
            shipped[c["metadata"]["annotations"]["moemesh.io/source"]] = (k, v)
    rules = of_kind(docs, "PrometheusRule")
    groups = [g for r in rules for g in r["spec"]["groups"]]
    seen = 0
    for dirpath, _, files in os.walk(DASHBOARDS):
        for f in files:
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, REPO)
            inner = os.path.relpath(full, DASHBOARDS)
            seen += 1
            if f.endswith(".json"):
                content = open(full, encoding="utf-8").read()
                json.loads(content)
                ensure(rel in shipped, f"{rel}: no dashboard ConfigMap")
                ensure(shipped[rel] == (f, content), f"{rel}: the ConfigMap's copy differs from the file")
            elif re.fullmatch(r"rules/[^/]+\.ya?ml", inner) and not re.search(r"(_test|\.test)\.ya?ml$", f):
                file_groups = (yaml.safe_load(open(full)) or {}).get("groups") or []
                ensure(file_groups, f"{rel}: a rules file without groups")
                if with_crds:
                    for g in file_groups:
                        ensure(g in groups, f"{rel}: group {g.get('name')} not in the PrometheusRule")
            elif re.search(r"(_test|\.test)\.ya?ml$", f) or f.lower().startswith("readme") or f.endswith(".md"):
                continue  # promtool unit tests and notes: not shipped
            else:
                raise Failure(f"{rel}: the chart ships neither it nor a rule saying it should not")
    ensure(seen > 0, "dashboards/ is empty")
    ensure(len(shipped) == sum(1 for _, _, fs in os.walk(DASHBOARDS) for f in fs if f.endswith(".json")),
           "ConfigMaps without a source file")


def check_rules_promtool(docs, promtool):
    rules = of_kind(docs, "PrometheusRule")
    ensure(rules, "no PrometheusRule")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}, f)
        f.flush()
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True, timeout=60)
        ensure(r.returncode == 0, f"promtool check rules:\n{r.stdout}{r.stderr}")


def check_model(docs, variant):
    for w in workloads(docs):
        c = main_container(w)
        pod = w["spec"]["template"]["spec"]
        role = c["args"][0]
        if role == "kvstore":
            ensure(not any(v["name"] == "model" for v in pod["volumes"]), "the KV store mounts no model")
            continue
        model = flag(c["args"], "--model")
        ensure(model and model.startswith("/models"), f"{role}: --model {model}")
        vol = next(v for v in pod["volumes"] if v["name"] == "model")
        mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
        ensure(mount["readOnly"] is True, f"{role}: model mounted writable")
        if variant == "cpu":
            ensure("emptyDir" in vol and pod["initContainers"][0]["name"] == "fetch-model", f"{role}: objectStorage init container")
            ensure(model == "/models/mixtral-tiny", f"{role}: --model {model}")
        elif variant == "gpu":
            ensure(vol["hostPath"]["path"] == "/mnt/models", f"{role}: hostPath")
        elif variant == "pools":
            ensure(vol["persistentVolumeClaim"]["claimName"] == "models-rox", f"{role}: existing claim")
        else:
            ensure(vol["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-moemesh-model", f"{role}: chart's claim")


def check_kvstore(docs, variant):
    kv = [w for w in of_kind(docs, "StatefulSet") if main_container(w)["args"][0] == "kvstore"]
    att = next(w for w in workloads(docs) if main_container(w)["args"][0] == "attention")
    if variant == "pools":
        ensure(not kv and not flag(main_container(att)["args"], "--kvstore"), "kvstore disabled")
        return
    ensure(len(kv) == 1, "one KV store StatefulSet")
    args = main_container(kv[0])["args"]
    if variant == "kvstore-memory-only":  # persistence disabled: no claim, no disk tier flags
        ensure(not kv[0]["spec"].get("volumeClaimTemplates"), "no disk-tier PVC without persistence")
        ensure(flag(args, "--disk-dir") is None and flag(args, "--disk-budget-bytes") is None, "no disk tier flags")
        return
    vct = kv[0]["spec"]["volumeClaimTemplates"]
    ensure(vct and vct[0]["metadata"]["name"] == "disk-tier", "KV store disk-tier PVC")
    mount = next((m for m in main_container(kv[0])["volumeMounts"] if m["name"] == "disk-tier"), None)
    ensure(mount is not None, "disk tier mounted")
    ensure(flag(args, "--disk-dir") == mount["mountPath"], f"--disk-dir={flag(args, '--disk-dir')} is the mount")
    want = {"cpu": "193273528320"}.get(variant, "48318382080")  # cpu.yaml's 180 GiB, else the default 45 GiB
    ensure(flag(args, "--disk-budget-bytes") == want, f"--disk-budget-bytes={flag(args, '--disk-budget-bytes')}")
    ensure(flag(main_container(att)["args"], "--compute-threads") == "$(MOEMESH_CPU_LIMIT)",
           "attention's kernel threads follow its CPU limit")
    ensure(flag(main_container(att)["args"], "--kvstore").startswith(f"tcp://{kv[0]['metadata']['name']}-0."), "attention uses shard 0")


def check_pools(docs):
    experts = {pool_of(w): main_container(w) for w in of_kind(docs, "StatefulSet") if main_container(w)["args"][0] == "expert"}
    ensure(flag(experts["layer0"]["args"], "--experts") == "0:*", "pinned pool passes --experts")
    ensure(flag(experts["big"]["args"], "--experts") is None, "assigned pool has no --experts")
    ensure(flag(experts["big"]["args"], "--compute-threads") == "6", "poolDefaults.computeThreads")
    ensure(flag(experts["small"]["args"], "--compute-threads") == "$(MOEMESH_CPU_LIMIT)", "a pool's 0 overrides the default")
    ensure(experts["big"]["resources"]["limits"]["cpu"] == "32", "a pool's own resources")


# ---- groups ---------------------------------------------------------------------------------------
def group_render(run):
    values_files = [None] + sorted(os.listdir(VALUES))
    for vf in values_files:
        argv = ["lint", "--strict", CHART] + (["-f", os.path.join(VALUES, vf)] if vf else [])
        def lint(argv=argv):
            r = run.helm(*argv)
            ensure(r.returncode == 0, f"{r.stdout}{r.stderr}")
        run.check(f"helm lint --strict ({vf or 'default values'})", lint)
    for name, v in VARIANTS.items():
        with_crds = MON in v["apis"]
        def rendered(name=name):
            run.render(name)
        run.check(f"{name}: helm template", rendered)
        if name not in run.rendered:
            continue
        docs = run.rendered[name]
        run.check(f"{name}: every container has probes, resources, a locked-down securityContext", check_containers, docs)
        run.check(f"{name}: PodDisruptionBudget and topology spread per workload", check_pdb_and_spread, docs)
        run.check(f"{name}: every service is scraped", check_scraped, docs, with_crds)
        run.check(f"{name}: ZeroMQ endpoints are stable per-pod names", check_endpoints, docs)
        run.check(f"{name}: router (--expert-hosts, tenants, API Service)", check_router, docs, v["hosts"], v.get("tenants", False))
        run.check(f"{name}: accelerator {'nvidia' if v.get('gpu') else 'cpu'}", check_accelerator, docs, v.get("gpu", False))
        run.check(f"{name}: LoRA adapters", check_lora, docs, v.get("lora"))
        run.check(f"{name}: expert pool autoscalers", check_autoscaling, docs, v["scalers"], v.get("signals", {}),
                  v.get("thresholds", {}))
        run.check(f"{name}: dashboards/ shipped whole", check_dashboards_and_rules, docs, with_crds)
        run.check(f"{name}: model volume", check_model, docs, name)
        run.check(f"{name}: KV store", check_kvstore, docs, name)
        if with_crds and name == "default":
            if run.args.promtool:
                run.check(f"{name}: promtool check rules on the PrometheusRule", check_rules_promtool, docs, run.args.promtool)
            else:
                run.skip("promtool check rules", "promtool not found")
    if "pools" in run.rendered:
        run.check("pools: pinned and assigned pools, per-pool settings", check_pools, run.rendered["pools"])

    for f, path in BAD_VALUES.items():
        def bad(f=f, path=path):
            r = run.template([os.path.join(BAD, f)])
            ensure(r.returncode != 0, "rendered without an error")
            ensure("values don't meet the specifications of the schema" in r.stderr, f"not a schema error:\n{r.stderr}")
            ensure(f"'{path}'" in r.stderr, f"the message does not name {path}:\n{r.stderr}")
        run.check(f"schema rejects bad/{f} at {path}", bad)
    for sets, msg in BAD_SETS:
        def bad_set(sets=sets, msg=msg):
            r = run.template(sets=sets)
            ensure(r.returncode != 0, "rendered without an error")
            ensure(msg in r.stderr, f"want {msg!r} in:\n{r.stderr}")
        run.check(f"template refuses {' '.join(sets)}", bad_set)


def group_schemas(run):
    node = shutil.which("node")
    validator = os.path.join(run.args.tools or "", "node_modules", "kubernetes-models")
    if not node or not run.args.tools or not os.path.isdir(validator):
        run.skip("object schemas", "node or .cache/chart-tools/node_modules/kubernetes-models missing (run scripts/bootstrap)")
        return
    def rejects_broken():  # the validator itself: a wrong type and a missing field must fail
        broken = [{"source": "self-test", "object": {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"},
                   "spec": {"replicas": "two", "serviceName": "x", "selector": {"matchLabels": {"a": "b"}},
                            "template": {"spec": {"containers": [{"image": "i"}]}}}}}]
        r = subprocess.run([node, os.path.join(HERE, "validate_objects.mjs"), run.args.tools],
                           input=json.dumps(broken), capture_output=True, text=True, timeout=60)
        ensure(r.returncode == 1 and "replicas" in r.stdout, f"a broken StatefulSet passed:\n{r.stdout}{r.stderr}")
    run.check("the schema validator rejects a broken object", rejects_broken)
    for name in VARIANTS:
        def validate(name=name):
            docs = run.render(name)
            items = [{"source": name, "object": d} for d in docs]
            r = subprocess.run([node, os.path.join(HERE, "validate_objects.mjs"), run.args.tools],
                               input=json.dumps(items), capture_output=True, text=True, timeout=120)
            ensure(r.returncode == 0, f"\n{r.stdout}{r.stderr}")
            print("     " + r.stdout.strip().splitlines()[-1])
        run.check(f"{name}: objects valid against the API schemas", validate)


def group_dockerfiles(run):
    lint = os.path.join(run.args.tools or "", "node_modules", ".bin", "dockerfile-utils")
    if not run.args.tools or not os.path.exists(lint):
        run.skip("Dockerfile lint", "dockerfile-utils missing (run scripts/bootstrap)")
        return
    deploy = os.path.join(REPO, "deploy")
    files = sorted(f for f in os.listdir(deploy) if re.fullmatch(r"Dockerfile(\.[a-z0-9]+)?", f) and not f.endswith(".dockerignore"))
    ensure(files, "no Dockerfile in deploy/")
    for f in files:
        def check(f=f):
            path = os.path.join(deploy, f)
            r = subprocess.run([lint, "lint", path], capture_output=True, text=True, timeout=60)
            ensure(r.returncode == 0 and not r.stdout.strip(), f"\n{r.stdout}{r.stderr}")
            text = open(path).read()
            ensure(re.search(r"^USER 10001", text, re.M), "runs as the non-root user 10001")
            ensure(len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage")
            ensure("ENTRYPOINT [\"/usr/local/bin/moemesh-entrypoint\"]" in text, "the entrypoint chooses the service")
            ensure(os.path.exists(path + ".dockerignore"), "a .dockerignore beside it")
        run.check(f"dockerfile-utils lint deploy/{f}", check)
    def entrypoint():
        r = subprocess.run(["sh", "-n", os.path.join(deploy, "entrypoint.sh")], capture_output=True, text=True)
        ensure(r.returncode == 0, r.stderr)
    run.check("deploy/entrypoint.sh parses", entrypoint)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--helm", required=True)
    ap.add_argument("--tools", help=".cache/chart-tools (node packages)")
    ap.add_argument("--promtool", default=shutil.which("promtool"))
    ap.add_argument("group", choices=["render", "schemas", "dockerfiles"])
    args = ap.parse_args()
    run = Runner(args)
    if args.group != "dockerfiles" and not os.access(args.helm, os.X_OK):
        print(f"FAIL helm not found at {args.helm} (run scripts/bootstrap)")
        print("0 passed, 1 failed")
        return 1
    {"render": group_render, "schemas": group_schemas, "dockerfiles": group_dockerfiles}[args.group](run)
    print(f"{run.passed} passed, {run.failed} failed" + (f", {run.skipped} skipped" if run.skipped else ""))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
