"""Helpers of the observability tests: a real local cluster (one process per service), traffic,
scrapes, span lines, the metric contract (docs/metrics.md), the Prometheus text format (from
prom_text) and the scripts' common main. Stdlib only."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import types
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness as H  # noqa: E402  (process start-up, shared with the integration tests)
from harness import TestFailure, free_port, log  # noqa: E402,F401
from prom_text import parse_metrics, total  # noqa: E402,F401  (the text format; the bench tools use it alone)


def http(url, body=None, timeout=30.0, headers=None, with_headers=False):
    """(status, bytes) of one request; (status, bytes, response headers) with_headers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        out = e.code, e.read(), dict(e.headers)
    return out if with_headers else out[:2]


# ---------------------------------------------------------------------------------------------
# the contract


def load_contract(path):
    """{name: {type, unit, labels (set), service, status, meaning}} from the table of docs/metrics.md."""
    out = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`")
        labels = {l.strip() for l in cells[3].split(",") if l.strip()}
        out[name] = {"type": cells[1], "unit": cells[2], "labels": labels, "service": cells[4], "status": cells[5],
                     "meaning": cells[6]}
    if not out:
        raise TestFailure(f"{path}: no metric table found")
    return out


# ---------------------------------------------------------------------------------------------
# the cluster


def service_binaries(cli):
    """{service: path} of moemesh-<service> next to the CLI: installed side by side, or in the
    build tree (build/services/cli/moemesh -> build/services/<service>/moemesh-<service>)."""
    here = os.path.dirname(os.path.abspath(cli))
    out = {}
    for svc in ("router", "attention", "expert", "kvstore"):
        for path in (os.path.join(here, f"moemesh-{svc}"), os.path.join(here, "..", svc, f"moemesh-{svc}")):
            if os.path.exists(path):
                out[svc] = os.path.abspath(path)
                break
        else:
            raise TestFailure(f"moemesh-{svc} not found next to {cli}: build it")
    return out


def write_tenants(path, cli, tenants):
    """A router --tenants file: tenants = {name: api key} (no limits); keys hashed by `moemesh hash-key`."""
    H.tenants_file(path, H.Cli(cli, dict(os.environ)), [(name, [key], {}) for name, key in tenants.items()])


class Cluster:
    """A real cluster on loopback, one process per service (tests/integration/harness.py starts
    them): router + coordinator, expert hosts, a KV store and attention workers using it.
    .services = {name: admin "host:port"}; each process logs to .log_path(name).

    model: a checkpoint folder (default: a tiny f32 Mixtral written into tmp); tenants: a router
    --tenants file; expert_extra: flags for every expert host; router_extra: flags for the router."""

    def __init__(self, cli, tmp, attention=1, experts=2, replicas=1, model=None, tenants=None, expert_extra=(),
                 router_extra=(), tag="obs", timeout=60.0):
        self.cli, self.tmp = cli, tmp
        self.model = model or os.path.join(tmp, "tiny")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        if not os.path.exists(os.path.join(self.model, "config.json")):
            subprocess.run([cli, "mkmodel", "--arch", "mixtral", "--preset", "tiny", "--seed", "1", "--out", self.model,
                            "--dtype", "f32"], check=True, capture_output=True, env=env, timeout=120)
        args = types.SimpleNamespace(cli=cli, **service_binaries(cli))
        self.h = H.Cluster(args, tmp, self.model, tag=tag)
        try:
            self.h.start_router(experts, replicas, (("--tenants", tenants) if tenants else ()) + tuple(router_extra))
            kv = self.h.start_kvstore()
            for _ in range(experts):
                self.h.start_expert(expert_extra)
            for _ in range(attention):
                # No memory tier: every prefix lookup reaches the KV store, whose series must move.
                self.h.start_attention(("--kvstore", kv.endpoint, "--local-prefix-cache-mb", "0"))
            self.h.wait_ready(timeout)
        except (H.TestFailure, TestFailure) as e:
            self.h.__exit__(type(e), e, None)
            raise TestFailure(f"cluster did not start: {e}") from e
        self.api_port = self.h.api_port
        self.services = {p.name: f"127.0.0.1:{p.admin_port}" for p in self.h.procs}
        log(f"cluster up: {', '.join(f'{k}={v}' for k, v in self.services.items())}")

    @staticmethod
    def service_of(name):
        """'expert-1' -> 'expert' (the contract's service column)."""
        return re.sub(r"-\d+$", "", name)

    def api(self, path):
        return f"http://127.0.0.1:{self.api_port}{path}"

    def log_path(self, name):
        return next(p.log_path for p in self.h.procs if p.name == name)

    def scrape(self, name):
        status, body = http(f"http://{self.services[name]}/metrics", timeout=5)
        if status != 200:
            raise TestFailure(f"{name} /metrics answered {status}")
        return body.decode()

    def logs(self):
        out = []
        for p in self.h.procs:
            out.append(f"--- {p.name}\n" + "".join(p.log_text().splitlines(True)[-30:]))
        return "\n".join(out)

    def stop(self):
        """SIGTERM to every service; one that does not exit within 10 s is a problem (killed, reported)."""
        self.stuck = []
        for p in reversed(self.h.procs):
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        for p in self.h.procs:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.stuck.append(p.name)
        if self.stuck:
            log(f"services that did not exit after SIGTERM (killed): {self.stuck}")
        self.h.kill_all()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            print(self.logs())
        self.stop()
        return False


PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Mixture of experts models route every token to a few experts",
    "Prometheus scrapes every service of the cluster once a second",
    "Once upon a time there was a cluster of small services",
]


def drive_traffic(cluster, rounds=2, max_tokens=12):
    """Completions with several prompts (several experts busy), a repeated prompt (prefix cache)
    and one bad request (an error series). Returns the number of good answers."""
    ok = 0
    for r in range(rounds):
        for i, p in enumerate(PROMPTS):
            status, body = http(cluster.api("/v1/completions"),
                                {"prompt": p * (1 + i % 3), "max_tokens": max_tokens, "temperature": 0.8, "seed": r * 10 + i})
            if status != 200:
                raise TestFailure(f"completion answered {status}: {body[:300]!r}")
            ok += 1
    status, _ = http(cluster.api("/v1/completions"), {"prompt": "x", "max_tokens": -1})
    if status != 400:
        raise TestFailure(f"a bad request answered {status}, expected 400")
    return ok


def tmpdir(prefix):
    return tempfile.mkdtemp(prefix=prefix)


def span_lines(path):
    """The JSON span lines (actors/trace_span.h) of a service's log."""
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def run_main(body, prefix, passed, keep=False):
    """The scripts' main: body(tmp, problems) in a fresh temp folder (removed unless keep);
    prints every problem and returns 1, or prints `passed` and returns 0."""
    tmp = tmpdir(prefix)
    problems = []
    try:
        body(tmp, problems)
    except TestFailure as e:
        problems.append(str(e))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        print("\n".join(["FAIL:"] + [f"  {p}" for p in problems]), flush=True)
        return 1
    log(f"PASS: {passed}")
    return 0
