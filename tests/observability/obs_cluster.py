"""Helpers of the observability tests: a real local cluster (`moemesh up`), traffic, scrapes,
the metric contract (docs/metrics.md) and a Prometheus text-format parser. Stdlib only."""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no orphan cluster if the test dies


class TestFailure(AssertionError):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
# the text format

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{family: {"type": t, "samples": [(sample name, {labels}, value)]}}."""
    fams = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, t = line.split(None, 3)
            types[name] = t
            fams.setdefault(name, {"type": t, "samples": []})
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(3) or "")), float(m.group(4))
        fam = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                fam = name[: -len(suffix)]
        fams.setdefault(fam, {"type": types.get(fam, "untyped"), "samples": []})["samples"].append((name, labels, value))
    return fams


def total(fams, name, **match):
    """Sum of a family's plain samples (the _count of a histogram) whose labels match."""
    fam = fams.get(name)
    if not fam:
        return 0.0
    want = name + "_count" if fam["type"] == "histogram" else name
    return sum(v for n, l, v in fam["samples"] if n == want and all(l.get(k) == x for k, x in match.items()))


# ---------------------------------------------------------------------------------------------
# the cluster


class Cluster:
    """`moemesh up` on loopback with free ports; .services = {name: admin "host:port"}."""

    def __init__(self, cli, tmp, attention=1, experts=2, replicas=1):
        self.cli, self.tmp = cli, tmp
        self.model = os.path.join(tmp, "tiny")
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        if not os.path.exists(os.path.join(self.model, "config.json")):
            subprocess.run([cli, "mkmodel", "--arch", "mixtral", "--preset", "tiny", "--seed", "1", "--out", self.model,
                            "--dtype", "f32"], check=True, capture_output=True, env=env, timeout=120)
        self.api_port, self.control_port, self.admin_port = free_port(), free_port(), free_port()
        while self.control_port + 1 in (self.api_port, self.admin_port):
            self.control_port = free_port()
        self.log_dir = os.path.join(tmp, "logs")
        argv = [cli, "up", "--model", self.model, "--port", str(self.api_port), "--control-port",
                str(self.control_port), "--admin-port", str(self.admin_port), "--attention", str(attention), "--experts",
                str(experts), "--replicas", str(replicas), "--cores", "2", "--log-dir", self.log_dir,
                "--host", "127.0.0.1", "--startup-timeout", "60"]
        self.out_path = os.path.join(tmp, "up.out")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=_die_with_parent)
        self.services = {}
        self.pids = []  # the children moemesh up reported, to reap if it cannot stop them
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = open(self.out_path, encoding="utf-8", errors="replace").read()
            if "logs " in text and "metrics" in text:
                for m in re.finditer(r"^\s+(\S+)\s+pid (\d+)\s+http://(\S+)/metrics", text, re.M):
                    self.services[m.group(1)] = m.group(3)
                    self.pids.append(int(m.group(2)))
                break
            if self.proc.poll() is not None:
                raise TestFailure(f"moemesh up exited {self.proc.returncode}:\n{text}\n{self.logs()}")
            time.sleep(0.2)
        if not self.services:
            raise TestFailure("moemesh up did not report a ready cluster in 90 s:\n" + self.logs())
        log(f"cluster up: {', '.join(f'{k}={v}' for k, v in self.services.items())}")

    @staticmethod
    def service_of(name):
        """'expert-1' -> 'expert' (the contract's service column)."""
        return re.sub(r"-\d+$", "", name)

    def api(self, path):
        return f"http://127.0.0.1:{self.api_port}{path}"

    def scrape(self, name):
        status, body = http(f"http://{self.services[name]}/metrics", timeout=5)
        if status != 200:
            raise TestFailure(f"{name} /metrics answered {status}")
        return body.decode()

    def logs(self):
        out = []
        if os.path.isdir(self.log_dir):
            for fn in sorted(os.listdir(self.log_dir)):
                with open(os.path.join(self.log_dir, fn), errors="replace") as f:
                    out.append(f"--- {fn}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(out)

    def stop(self):
        """SIGTERM to moemesh up (it stops the services in order); whatever is left after 20 s is
        killed by pid and reported as a problem (a service that does not exit on SIGTERM)."""
        self.stuck = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"moemesh-" not in f.read():
                        continue  # the pid was reused by something else
                os.kill(pid, signal.SIGKILL)
                self.stuck.append(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        if self.stuck:
            log(f"killed services that did not exit after SIGTERM: pids {self.stuck}")
        self._out.close()

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
