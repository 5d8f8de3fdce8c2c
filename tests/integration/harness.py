"""Harness for moemesh cluster integration tests: real processes on loopback.

Stdlib + numpy only. What it offers:
  - Cluster: starts services (router, attention, expert, kvstore) on free loopback ports with
    --threads 1 and OPENBLAS_NUM_THREADS=1, logs each to a file, waits for /readyz, and always
    kills everything at the end (also when the harness dies: PR_SET_PDEATHSIG); a failed run
    prints every process's log.
  - http(): one HTTP request, returns (status, parsed JSON or raw bytes).
  - Cli: `moemesh mkmodel` / `moemesh generate` (the in-process reference engine).
  - Zmtp: a minimal ZMTP 3.0 NULL-mechanism DEALER written by hand (pyzmq is not available),
    enough to send arbitrary frames to a service's ROUTER socket and read its replies.
  - wire_header(): the moemesh data-plane header frame (core/wire.h), for well-formed or
    deliberately broken frames.
  - safetensors_tensors(): a checkpoint's tensor table parsed from the safetensors headers.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.client import HTTPConnection

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # Runs in the child between fork and exec: SIGKILL it when the harness (its parent thread) dies.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class TestFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free right now and not handed out before by this harness (the kernel
    readily gives a just-closed port again)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free right now (moemesh up binds its placement
    publisher on the control port + 1)."""
    while True:
        p = free_port()
        if p + 1 in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        _handed_out.add(p + 1)
        return p


# ---------------------------------------------------------------------------------------------
# arguments shared by every test script


def parse_args(extra=None):
    p = argparse.ArgumentParser()
    p.add_argument("--cli", required=True, help="path of the moemesh CLI")
    p.add_argument("--router", required=True)
    p.add_argument("--attention", required=True)
    p.add_argument("--expert", required=True)
    p.add_argument("--kvstore", required=True)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (models, logs)")
    if extra:
        extra(p)
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# HTTP


def http(port, path, body=None, method=None, timeout=60.0, raw_body=None, headers=None):
    """One request to 127.0.0.1:port. Returns (status, json-or-bytes)."""
    data = None
    hdrs = dict(headers or {})
    if raw_body is not None:
        data = raw_body
    elif body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def stream(port, path, body, headers=None, timeout=60.0, stop_after=None, times=None):
    """POST body (with "stream": true) and read the Server-Sent Events. Returns (status, events):
    events are the parsed `data:` payloads (dicts, and the string "[DONE]"); a non-200 answer gives
    (status, parsed JSON body). stop_after=k hangs up after k events, as a client that goes away.
    times: a list that gets each event's arrival (time.monotonic())."""
    conn = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        if r.status != 200:
            return r.status, json.loads(r.read())
        check(r.getheader("Content-Type", "").startswith("text/event-stream"),
              f"a stream answered with Content-Type {r.getheader('Content-Type')}")
        events = []
        while True:
            line = r.readline()  # http.client undoes the chunked transfer encoding
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            if times is not None:
                times.append(time.monotonic())
            if events[-1] == "[DONE]" or (stop_after and len(events) >= stop_after):
                break
        return 200, events
    finally:
        if conn.sock:  # a hard close, so the server sees the client leave
            conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def streams_with_a_fault(port, bodies, fault, min_events=4, timeout=120.0):
    """Runs one completion stream per body concurrently; once every stream has `min_events`
    events, calls fault() (e.g. a kill -9) and notes the time. Returns (results, times, t_fault):
    results[i] is stream()'s (status, events), times[i] each event's arrival."""
    times = [[] for _ in bodies]
    results = [None] * len(bodies)

    def one(i):
        results[i] = stream(port, "/v1/completions", dict(bodies[i], stream=True), timeout=timeout, times=times[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while min(len(t) for t in times) < min_events and time.monotonic() < deadline:
        time.sleep(0.005)
    started = min(len(t) for t in times) >= min_events
    if started:
        fault()
    t_fault = time.monotonic()
    for t in threads:
        t.join()
    check(started, f"the streams did not reach {min_events} events within 60 s")
    return results, times, t_fault


def stall_after(times, t):
    """The longest gap between two consecutive events that ends after t (0 when none)."""
    return max([b - a for a, b in zip(times, times[1:]) if b > t], default=0.0)


def stream_text(events, index=0, chat=False):
    """The text of one choice, joined from its stream chunks."""
    out = ""
    for e in events:
        if not isinstance(e, dict):
            continue
        for c in e.get("choices", []):
            if c["index"] == index:
                out += (c["delta"].get("content") or "") if chat else c["text"]
    return out


def tenants_file(path, cli, tenants):
    """Writes a router --tenants file: tenants are (name, [api keys], {extra fields})."""
    doc = {"tenants": []}
    for name, keys, extra in tenants:
        t = {"name": name, "api_key_sha256": [cli.run("hash-key", k).strip() for k in keys]}
        t.update(extra)
        doc["tenants"].append(t)
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def raw_http(port, payload: bytes, timeout=5.0, half_close=True) -> bytes:
    """Sends raw bytes to an HTTP port, returns whatever comes back before close/timeout."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, ConnectionError, OSError):
            pass
    return out


def status_of(raw: bytes):
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# the CLI: models and the reference engine


class Cli:
    def __init__(self, path, env):
        self.path = path
        self.env = env

    def run(self, *args, timeout=60):
        p = subprocess.run([self.path, *map(str, args)], capture_output=True, text=True, env=self.env,
                           timeout=timeout, preexec_fn=_die_with_parent)
        if p.returncode != 0:
            raise TestFailure(f"moemesh {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def mkmodel(self, arch, out, seed=1, preset="tiny", dtype="f32"):
        self.run("mkmodel", "--arch", arch, "--preset", preset, "--seed", seed, "--out", out, "--dtype", dtype)
        return out

    def generate(self, model, prompt_ids=None, prompt=None, max_tokens=8, temperature=0.0, seed=None, logits=True,
                 extra=()):
        args = ["generate", "--model", model, "--max-tokens", max_tokens, "--temperature", temperature, "--json",
                *extra]
        if prompt_ids is not None:
            args += ["--prompt-ids", ",".join(map(str, prompt_ids))]
        else:
            args += ["--prompt", prompt]
        if seed is not None:
            args += ["--seed", seed]
        if logits:
            args.append("--logits")
        return json.loads(self.run(*args))


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare_with_reference(name, choice, ref, check_logits=True, tol=1e-5):
    """The cluster's choice (token_ids, logits) against `moemesh generate --json --logits`.

    Alignment: the cluster's logits[i] is the row that sampled output token i; generate's
    logits[0] is the last prompt position (which samples output token 0), logits[i] the position
    of generated token i-1, so cluster row i == generate row i.
    """
    got = choice.get("token_ids")
    want = ref["output_ids"]
    check(got == want, f"{name}: cluster tokens {got} != reference {want}")
    if not check_logits:
        return 0.0
    rows = choice.get("logits")
    check(rows is not None, f"{name}: no logits in the cluster's answer (return_logits)")
    check(len(rows) == len(want), f"{name}: {len(rows)} logits rows for {len(want)} tokens")
    ref_rows = ref["logits"]
    check(len(ref_rows) >= len(rows), f"{name}: reference has {len(ref_rows)} logits rows < {len(rows)}")
    worst = 0.0
    for i, row in enumerate(rows):
        check(len(row) == len(ref_rows[i]), f"{name}: logits row {i} has {len(row)} values, reference {len(ref_rows[i])}")
        e = rel_err(row, ref_rows[i])
        worst = max(worst, e)
        check(e <= tol, f"{name}: logits row {i} differs from the reference by {e:.3g} relative (limit {tol})")
    return worst


# ---------------------------------------------------------------------------------------------
# safetensors


def safetensors_tensors(model_dir):
    """{name: nbytes} over every *.safetensors file of the folder, from the headers alone."""
    out = {}
    for fn in sorted(os.listdir(model_dir)):
        if not fn.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, fn), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            lo, hi = info["data_offsets"]
            out[name] = hi - lo
    return out


EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.")


def expert_bytes(tensors):
    """{(layer, expert): bytes} of the routed experts' tensors (shared experts excluded)."""
    out = {}
    for name, nb in tensors.items():
        m = EXPERT_TENSOR.match(name)
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            out[key] = out.get(key, 0) + nb
    return out


def parse_expert_set(spec):
    """'0:0-3,1:5' (format_expert_set) -> {(0,0),(0,1),(0,2),(0,3),(1,5)}."""
    out = set()
    for item in filter(None, spec.split(",")):
        layer, experts = item.split(":")
        if "-" in experts:
            lo, hi = experts.split("-")
        else:
            lo = hi = experts
        for e in range(int(lo), int(hi) + 1):
            out.add((int(layer), e))
    return out


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    def __init__(self, name, argv, log_path, env, admin_port=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.admin_port = admin_port
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_text(self):
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, pattern, timeout=10.0):
        """Waits for a regex in the log; returns the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if not self.alive():
                raise TestFailure(f"{self.name} exited ({self.popen.returncode}) before logging /{pattern}/")
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name} did not log /{pattern}/ within {timeout} s")
            time.sleep(0.05)

    def metrics(self):
        status, body = http(self.admin_port, "/metrics", timeout=5)
        check(status == 200, f"{self.name} /metrics answered {status}")
        return body.decode() if isinstance(body, bytes) else str(body)

    def metric(self, name):
        """The value of an unlabelled (or first labelled) sample of a metric, or None."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def terminate_and_wait(self, timeout=5.0):
        """SIGTERM; returns (exit code, seconds) or raises when it does not exit in time."""
        t0 = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"{self.name} (pid {self.pid}) did not exit within {timeout} s of SIGTERM")
        return rc, time.monotonic() - t0

    def kill(self):
        if self.alive():
            self.popen.kill()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Cluster:
    """One router (+ coordinator) and the services attached to it. Use as a context manager."""

    def __init__(self, args, tmp, model, tag="c"):
        self.args = args
        self.tmp = tmp
        self.model = model
        self.tag = tag
        self.env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.procs: list[Proc] = []
        self.router = None
        self.attention: list[Proc] = []
        self.experts: list[Proc] = []
        self.kvstores: list[Proc] = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.dump_logs()
        self.kill_all()
        return False

    def _start(self, name, argv, admin_port):
        p = Proc(name, argv, os.path.join(self.tmp, f"{self.tag}-{name}.log"), self.env, admin_port)
        self.procs.append(p)
        return p

    def start_router(self, expert_hosts, replicas=1, extra=()):
        self.api_port, self.admin_port = free_port(), free_port()
        self.control = f"tcp://127.0.0.1:{free_port()}"
        self.placement = f"tcp://127.0.0.1:{free_port()}"
        argv = [self.args.router, "--model", self.model, "--port", str(self.api_port), "--admin-port",
                str(self.admin_port), "--http-address", "127.0.0.1", "--admin-address", "127.0.0.1",
                "--control", self.control, "--placement", self.placement, "--expert-hosts", str(expert_hosts),
                "--replicas", str(replicas), "--threads", "1", *extra]
        self.router = self._start("router", argv, self.admin_port)
        return self.router

    def restart_router(self):
        """Starts the router again with the arguments (and ports) of the last one, as `moemesh up`
        or a Deployment would after it died. Its log goes to a file of its own."""
        runs = sum(p.name.startswith("router") for p in self.procs)
        self.router = self._start(f"router-run{runs + 1}", self.router.argv, self.admin_port)
        return self.router

    def start_expert(self, extra=()):
        i = len(self.experts)
        admin, port = free_port(), free_port()
        argv = [self.args.expert, "--model", self.model, "--listen", f"tcp://127.0.0.1:{port}", "--router",
                self.control, "--admin-port", str(admin), "--admin-address", "127.0.0.1", "--threads", "1",
                "--compute-threads", "1", "--instance", f"expert-{i}", *extra]
        p = self._start(f"expert-{i}", argv, admin)
        p.port, p.endpoint = port, f"tcp://127.0.0.1:{port}"
        self.experts.append(p)
        return p

    def start_attention(self, extra=()):
        i = len(self.attention)
        admin, port = free_port(), free_port()
        argv = [self.args.attention, "--model", self.model, "--router", self.control, "--placement", self.placement,
                "--listen", f"tcp://127.0.0.1:{port}", "--admin-port", str(admin), "--admin-address",
                "127.0.0.1", "--threads", "1", "--instance", f"attention-{i}", *extra]
        p = self._start(f"attention-{i}", argv, admin)
        p.port, p.endpoint = port, f"tcp://127.0.0.1:{port}"
        self.attention.append(p)
        return p

    def start_kvstore(self, extra=()):
        i = len(self.kvstores)
        admin, port = free_port(), free_port()
        argv = [self.args.kvstore, "--listen", f"tcp://127.0.0.1:{port}", "--router", self.control,
                "--admin-port", str(admin), "--admin-address", "127.0.0.1", "--threads", "1", "--instance",
                f"kvstore-{i}", *extra]
        p = self._start(f"kvstore-{i}", argv, admin)
        p.port, p.endpoint = port, f"tcp://127.0.0.1:{port}"
        self.kvstores.append(p)
        return p

    def up(self, attention=2, experts=4, replicas=1, kvstore=0, router_extra=(), attention_extra=(), timeout=30.0):
        t0 = time.monotonic()
        self.start_router(experts, replicas, router_extra)
        for _ in range(experts):
            self.start_expert()
        for _ in range(kvstore):
            self.start_kvstore()
        kv = ("--kvstore", self.kvstores[0].endpoint) if self.kvstores else ()
        for _ in range(attention):
            self.start_attention((*kv, *attention_extra))
        self.wait_ready(timeout)
        log(f"cluster {self.tag} ready in {time.monotonic() - t0:.1f} s "
            f"({attention} attention, {experts} expert hosts x{replicas}, {kvstore} kvstore)")
        return self

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        pending = list(self.procs)
        while pending:
            p = pending[0]
            if not p.alive():
                raise TestFailure(f"{p.name} exited with {p.popen.returncode} before it was ready")
            try:
                status, _ = http(p.admin_port, "/readyz", timeout=2)
            except (OSError, urllib.error.URLError):
                status = None
            if status == 200:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TestFailure(f"{p.name} not ready within {timeout} s (last /readyz: {status})")
            time.sleep(0.05)

    def complete(self, body, timeout=60.0):
        return http(self.api_port, "/v1/completions", body, timeout=timeout)

    def check_all_alive(self, procs=None):
        for p in procs if procs is not None else self.procs:
            check(p.alive(), f"{p.name} died (exit code {p.popen.returncode}); see its log")

    def attention_step_endpoints(self):
        """{instance: endpoint} from the router's 'coordinator: attention worker X at tcp://...' lines."""
        return dict(re.findall(r"coordinator: attention worker (\S+) at (tcp://\S+)", self.router.log_text()))

    def wait_scheduler_connected(self, timeout=10.0):
        """The scheduler connects to the attention workers a moment after /readyz says ready: waits
        for its log line per worker and for the connection's handshake bytes (when `ss` exists),
        so that later byte counts on a step port are steps only."""
        for p in self.attention:
            self.router.wait_log(rf"scheduler: attention worker {p.name} at", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(step_bytes_received(p.port) == 0 for p in self.attention):
            time.sleep(0.02)
        time.sleep(0.05)

    def check_no_expiry(self, allowed=(), where=""):
        """Fails when the coordinator expired a member that was alive (not in `allowed`)."""
        gone = re.findall(r"coordinator: (\S+) missed its heartbeats, removed", self.router.log_text())
        live = [g for g in gone if g not in allowed]
        check(not live, f"{where}the coordinator removed live members for missed heartbeats: {live} (every "
                        f"process was running; see the router's log)")

    def dump_logs(self, lines=80):
        for p in self.procs:
            text = p.log_text().splitlines()
            state = "running" if p.alive() else f"exit {p.popen.returncode}"
            print(f"----- log of {p.name} (pid {p.pid}, {state}): last {min(lines, len(text))} of {len(text)} lines "
                  f"-----\n" + "\n".join(text[-lines:]), flush=True)
            print(f"----- command: {' '.join(p.argv)}", flush=True)

    def kill_all(self):
        for p in self.procs:
            p.kill()


def step_bytes_received(port):
    """Bytes received on the connections to local TCP port PORT (a worker's step socket), from the
    kernel's tcp_info via `ss`; None when ss is not installed. Neither the attention workers' nor
    the router's /metrics count steps per worker, so this is how a test sees which worker worked."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))


def node_packages(args, *packages):
    """The node_modules folder that scripts/bootstrap fills, checked to hold `packages` (and node)."""
    node_modules = os.path.join(args.cache_dir, "js", "node_modules")
    for pkg in packages:
        check(shutil.which("node") and os.path.isdir(os.path.join(node_modules, pkg)),
              f"node or the {pkg} package is missing ({node_modules}); run scripts/bootstrap")
    return node_modules


def moemesh_up(args, tmp, model, attention=1, experts=2, timeout=60, extra=()):
    """`moemesh up` (the README's local cluster) on free ports, once it answers a completion.
    Returns (proc, port); the caller kills the proc."""
    port, control, admin = free_port(), free_port_pair(), free_port()
    up = Proc("up", [args.cli, "up", "--model", model, "--attention", str(attention), "--experts", str(experts),
                     "--port", str(port), "--control-port", str(control), "--admin-port", str(admin), "--cores", "2",
                     "--bin-dir", os.path.dirname(args.router), "--log-dir", os.path.join(tmp, "logs"),
                     *map(str, extra)],
              os.path.join(tmp, "up.log"), dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    deadline = time.monotonic() + timeout
    try:
        while True:
            check(up.alive(), f"moemesh up exited early:\n{up.log_text()}")
            try:
                if http(port, "/v1/models", timeout=2)[0] == 200 and http(
                        port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 1}, timeout=10)[0] == 200:
                    return up, port
            except OSError:
                pass
            check(time.monotonic() < deadline, f"moemesh up not serving within {timeout} s:\n{up.log_text()}")
            time.sleep(0.3)
    except BaseException:
        up.kill()
        raise


def wait_up_ready(up, text, timeout=90.0):
    """Waits for `moemesh up` (a Popen whose output `text()` returns) to print that its cluster is
    ready; fails when it exits first or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while "moemesh cluster ready" not in text():
        check(up.poll() is None, f"moemesh up exited ({up.returncode}):\n{text()}")
        check(time.monotonic() < deadline, f"moemesh up not ready within {timeout:.0f} s:\n{text()}")
        time.sleep(0.1)


def run_in_threads(fn, items, max_workers=None):
    """Calls fn(item) for each item concurrently; returns results in order; re-raises the first error."""
    results = [None] * len(items)
    errors = [None] * len(items)

    def work(i, item):
        try:
            results[i] = fn(item)
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i, it)) for i, it in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


def main(test_fn, extra_args=None):
    """Runs test_fn(args, tmp) with a temp dir; prints PASS/FAIL with the runtime; exit code 0/1."""
    args = parse_args(extra_args)
    tmp = tempfile.mkdtemp(prefix="moemesh-it-")
    t0 = time.monotonic()
    ok = False
    try:
        test_fn(args, tmp)
        ok = True
    except TestFailure as e:
        print(f"FAIL: {e}", flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("FAIL: unexpected error (above)", flush=True)
    finally:
        if not args.keep and ok:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not ok:
            print(f"(models and logs kept in {tmp})", flush=True)
    print(f"{'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.1f} s", flush=True)
    sys.exit(0 if ok else 1)


# ---------------------------------------------------------------------------------------------
# the data-plane header (core/wire.h)

KIND_STEP_REQUEST, KIND_STEP_RESPONSE, KIND_DISPATCH_REQUEST, KIND_DISPATCH_RESPONSE = 1, 2, 3, 4
KIND_KV_PUT, KIND_KV_GET, KIND_KV_GET_REPLY, KIND_ERROR = 5, 6, 7, 8
WIRE_MAGIC = 0x48534D4D
WIRE_PREFIX = 40


def wire_header(kind, request_id=1, meta=b"", tensors=(), version=1, magic=WIRE_MAGIC, n_tensors=None,
                meta_len=None):
    """Frame 0 of a data-plane message. tensors: [(dtype, [dims])]; dtype 0 = F32 (see core/dtype.h)."""
    out = struct.pack("<IHHQ16sHHI", magic, version, kind, request_id, b"\0" * 16,
                      len(tensors) if n_tensors is None else n_tensors, 0,
                      len(meta) if meta_len is None else meta_len)
    for dtype, dims in tensors:
        out += struct.pack("<BBH", dtype, len(dims), 0) + b"".join(struct.pack("<q", d) for d in dims)
    return out + meta


def parse_wire_header(frame):
    if len(frame) < WIRE_PREFIX:
        return None
    magic, version, kind, rid, _trace, n, _res, meta_len = struct.unpack_from("<IHHQ16sHHI", frame)
    return {"magic": magic, "version": version, "kind": kind, "request_id": rid, "n_tensors": n,
            "meta_len": meta_len}


# ---------------------------------------------------------------------------------------------
# protobuf, by hand (just enough for the control plane's StatusRequest and ErrorReply)


def pb_fields(buf):
    """Top-level fields of a protobuf message: [(field, wiretype, value)]; raises ValueError if bad."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = v = 0
        while True:
            if i >= len(buf):
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v

    while i < len(buf):
        key = varint()
        field, wt = key >> 3, key & 7
        if wt == 0:
            out.append((field, wt, varint()))
        elif wt == 1:
            out.append((field, wt, buf[i:i + 8]))
            i += 8
        elif wt == 2:
            n = varint()
            out.append((field, wt, buf[i:i + n]))
            i += n
        elif wt == 5:
            out.append((field, wt, buf[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"wire type {wt}")
    return out


STATUS_REQUEST = bytes([0x2A, 0x00])  # ControlMessage{status_request: {}} (field 5, empty message)


# ---------------------------------------------------------------------------------------------
# ZMTP 3.0, NULL mechanism: a DEALER peer by hand


class Zmtp:
    """A minimal ZMTP 3.0 DEALER connected to a ROUTER at tcp://host:port."""

    def __init__(self, endpoint, timeout=5.0, socket_type=b"DEALER", identity=b"", version=(3, 0), handshake=True):
        m = re.match(r"tcp://([^:]+):(\d+)$", endpoint)
        check(m is not None, f"not a tcp endpoint: {endpoint}")
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
        self.sock.settimeout(timeout)
        if handshake:
            self.handshake(socket_type, identity, version)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    @staticmethod
    def greeting(version=(3, 0)):
        return (b"\xff" + b"\0" * 8 + b"\x7f" + bytes(version) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31)

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("peer closed the connection")
            buf += chunk
        return buf

    def handshake(self, socket_type=b"DEALER", identity=b"", version=(3, 0)):
        self.sock.sendall(self.greeting(version))
        peer = self._recv_exact(64)
        check(peer[0] == 0xFF and peer[9] == 0x7F, f"not a ZMTP greeting: {peer[:12]!r}")
        props = self._prop(b"Socket-Type", socket_type)
        if identity:
            props += self._prop(b"Identity", identity)
        self.send_command(b"READY", props)
        name, _ = self.recv_command()
        check(name == b"READY", f"expected READY, got {name!r}")

    @staticmethod
    def _prop(name, value):
        return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value

    @staticmethod
    def frame(body, more=False, command=False):
        flags = (0x01 if more else 0) | (0x04 if command else 0)
        if len(body) > 255:
            return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
        return bytes([flags, len(body)]) + body

    def send_command(self, name, data=b""):
        self.sock.sendall(self.frame(bytes([len(name)]) + name + data, command=True))

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, *frames):
        out = b"".join(self.frame(f, more=i + 1 < len(frames)) for i, f in enumerate(frames))
        self.sock.sendall(out)

    def _recv_frame(self):
        flags = self._recv_exact(1)[0]
        if flags & 0x02:
            (n,) = struct.unpack(">Q", self._recv_exact(8))
        else:
            n = self._recv_exact(1)[0]
        return flags, self._recv_exact(n)

    def recv_command(self):
        while True:
            flags, body = self._recv_frame()
            if flags & 0x04:
                n = body[0]
                return body[1:1 + n], body[1 + n:]

    def recv(self, timeout=None):
        """One multipart message (a list of frames); commands (PING etc.) are skipped."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        frames = []
        while True:
            flags, body = self._recv_frame()
            if flags & 0x04:
                continue
            frames.append(body)
            if not flags & 0x01:
                return frames

    def request(self, *frames, timeout=5.0):
        self.send(*frames)
        return self.recv(timeout)
