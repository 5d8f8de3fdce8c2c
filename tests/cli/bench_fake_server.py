#!/usr/bin/python3
"""`moemesh bench` against a fake OpenAI-compatible server with known behaviour.

The server streams SSE chunks with a known first-token delay, packs two tokens into its second
chunk (so only the final usage chunk has the exact count), answers 429 for the key "limited",
500 for "broken", cuts the stream of "dropper" short and stalls for "slow". Each run's JSON report
must agree with what the server counted. Usage: bench_fake_server.py MOEMESH_BINARY
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIRST_DELAY_S = 0.05  # before the first token
TOKEN_DELAY_S = 0.002  # between chunks
VOCAB = 50
MODEL = "fake-model"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.posts = {}  # path -> count
        self.models_listed = 0
        self.by_key = {}  # key -> {"requests", "ok", "tokens", "text_chunks", "status": {code: n}, "dropped"}
        self.problems = []  # what the server found wrong with a request

    def key(self, k):
        return self.by_key.setdefault(k, {"requests": 0, "ok": 0, "tokens": 0, "gaps": 0, "status": {}, "dropped": 0})


STATS = Stats()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def chunk(self, text):
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def event(self, obj):
        self.chunk("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n")

    def do_GET(self):
        if self.path != "/v1/models":
            return self.send_json(404, {"error": {"message": "no route " + self.path}})
        with STATS.lock:
            STATS.models_listed += 1
        self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}, {"id": "other"}]})

    def problem(self, text):
        with STATS.lock:
            STATS.problems.append(text)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        chat = self.path == "/v1/chat/completions"
        with STATS.lock:
            STATS.posts[self.path] = STATS.posts.get(self.path, 0) + 1
            STATS.key(key)["requests"] += 1
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self.send_json(404, {"error": {"message": "no route " + self.path}})
        if body.get("model") != MODEL:
            self.problem(f"model {body.get('model')!r}")
        if body.get("ignore_eos") is not True or body.get("temperature") != 0:
            self.problem(f"ignore_eos/temperature: {body}")
        stream = body.get("stream") is True
        if stream and body.get("stream_options") != {"include_usage": True}:
            self.problem(f"stream without include_usage: {body}")
        if chat:
            prompt_tokens = len(body["messages"][0]["content"].split())
        elif isinstance(body.get("prompt"), list):
            ids = body["prompt"]
            if not all(isinstance(i, int) and 0 <= i < VOCAB for i in ids):
                self.problem(f"prompt ids outside the vocabulary: {ids}")
            prompt_tokens = len(ids)
        else:
            prompt_tokens = len(body["prompt"].split())
        n = int(body["max_tokens"])

        def status(code):
            with STATS.lock:
                s = STATS.key(key)["status"]
                s[code] = s.get(code, 0) + 1

        if key == "limited":
            status(429)
            return self.send_json(429, {"error": {"message": "tenant limited is over its rate", "type": "rate_limit_error"}})
        if key == "broken":
            status(500)
            return self.send_json(500, {"error": {"message": "the fake server broke", "type": "server_error"}})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        if not stream:
            time.sleep(FIRST_DELAY_S + 5 if key == "slow" else FIRST_DELAY_S)
            text = " ".join(f"t{i}" for i in range(n))
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            status(200)
            with STATS.lock:
                STATS.key(key)["ok"] += 1
                STATS.key(key)["tokens"] += n
            return self.send_json(200, {"object": "text_completion", "choices": [choice], "usage": usage})

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        status(200)
        if key == "slow":
            time.sleep(3)
            return
        obj = "chat.completion.chunk" if chat else "text_completion"

        def piece(text, finish=None):
            c = {"index": 0, "finish_reason": finish}
            c.update({"delta": {"content": text}} if chat else {"text": text})
            return {"object": obj, "model": MODEL, "choices": [c], "usage": None}

        if chat:  # vLLM opens a chat stream with the role and no text: not a token
            self.event({"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        time.sleep(FIRST_DELAY_S)
        # Token groups: the second chunk carries two tokens, the rest one each.
        groups = [[0]] + ([[1, 2]] if n >= 3 else [[1]] if n == 2 else []) + [[i] for i in range(3, n)]
        for k, g in enumerate(groups):
            if k:
                time.sleep(TOKEN_DELAY_S)
            self.event(piece("".join(f"t{i} " for i in g), "length" if k == len(groups) - 1 else None))
            if key == "dropper" and k == 1:
                with STATS.lock:
                    STATS.key(key)["dropped"] += 1
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # mid-stream, no terminating chunk
                return
        self.event({"object": obj, "model": MODEL, "choices": [], "usage": usage})
        self.event("[DONE]")
        self.chunk("")  # the terminating zero-length chunk
        with STATS.lock:
            s = STATS.key(key)
            s["ok"] += 1
            s["tokens"] += n
            s["gaps"] += len(groups) - 1  # inter-token gaps the client can see


def bench(moemesh, url, *args):
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    cmd = [moemesh, "bench", "--url", url, "--json", out.name, "--seed", "5", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    report = None
    if os.path.getsize(out.name):
        report = json.load(open(out.name))
    os.unlink(out.name)
    return p, report


def check(cond, what, *context):
    if not cond:
        print("FAIL:", what, *context, file=sys.stderr)
        sys.exit(1)
    print("ok", what)


def totals():
    with STATS.lock:
        ks = STATS.by_key
        return {
            "requests": sum(k["requests"] for k in ks.values()),
            "ok": sum(k["ok"] for k in ks.values()),
            "tokens": sum(k["tokens"] for k in ks.values()),
            "gaps": sum(k["gaps"] for k in ks.values()),
        }


def main():
    moemesh = sys.argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    # Closed loop, four tenants, the model from GET /v1/models, token-id prompts.
    p, r = bench(moemesh, url, "--concurrency", "4", "--requests", "40", "--tenant", "good:3", "--tenant", "limited:1",
                 "--tenant", "dropper:1", "--tenant", "broken:1", "--prompt-len", "7", "--output-len", "uniform:3:6",
                 "--vocab", str(VOCAB))
    check(p.returncode == 0 and r is not None, "concurrency run succeeds", p.stdout, p.stderr)
    t = totals()
    by = STATS.by_key
    check(not STATS.problems, "the server found every request well-formed", STATS.problems[:3])
    check(STATS.models_listed == 1, "the model came from GET /v1/models")
    check(r["config"]["model"] == MODEL, "the report names the model")
    check(r["requests"]["total"] == 40 == t["requests"], "40 requests sent and reported", r["requests"], t)
    check(r["requests"]["ok"] == t["ok"] == by["good"]["ok"] > 0, "ok requests match the server", r["requests"], t)
    check(r["failures"].get("429") == by["limited"]["status"].get(429) > 0, "429s counted", r["failures"])
    check(r["failures"].get("500") == by["broken"]["status"].get(500) > 0, "500s counted", r["failures"])
    check(r["failures"].get("incomplete_stream") == by["dropper"]["dropped"] > 0, "cut streams counted", r["failures"])
    check(r["requests"]["failed"] == 40 - t["ok"], "every other request failed")
    check(r["errors"]["429"] == "tenant limited is over its rate", "the server's error message is kept", r["errors"])
    # The second chunk carries two tokens: only the usage chunk's count matches the server's.
    check(r["output_tokens"] == t["tokens"], "output tokens equal the server's", r["output_tokens"], t["tokens"])
    check(r["prompt_tokens"] == 7 * t["ok"], "prompt tokens are the prompt lengths", r["prompt_tokens"])
    check(r["ttft_ms"]["count"] == t["ok"] and r["ttft_ms"]["p50"] >= FIRST_DELAY_S * 1e3 * 0.9,
          "TTFT covers the first-token delay", r["ttft_ms"])
    check(r["itl_ms"]["count"] == t["gaps"], "one inter-token gap per later text chunk", r["itl_ms"], t["gaps"])
    check(r["e2e_ms"]["p50"] >= r["ttft_ms"]["p50"] and r["e2e_ms"]["count"] == t["ok"], "E2E >= TTFT", r["e2e_ms"])
    check(r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0, "throughput reported")
    tenants = {s["tenant"]: s for s in r["tenants"]}
    check(set(tenants) == {"good", "limited", "dropper", "broken"}, "a section per tenant", list(tenants))
    check(tenants["good"]["requests"]["ok"] == by["good"]["ok"] and not tenants["good"]["failures"], "good tenant ok")
    check(tenants["good"]["output_tokens"] == by["good"]["tokens"], "good tenant's tokens")
    check(tenants["limited"]["requests"]["ok"] == 0 and tenants["limited"]["ttft_ms"] is None, "limited tenant refused")
    check(tenants["good"]["weight"] == 3 and tenants["good"]["requests"]["total"] > tenants["broken"]["requests"]["total"],
          "requests spread by weight", {k: v["requests"]["total"] for k, v in tenants.items()})
    for s in ("TTFT", "ITL", "E2E", "tenant limited", "429: "):
        check(s in p.stdout, f"the table shows {s!r}", p.stdout)

    # Open loop, chat endpoint, an explicit model, a line per request.
    STATS.reset()
    per_request = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    p, r = bench(moemesh, url, "--rate", "40", "--requests", "12", "--chat", "--model", MODEL, "--output-len", "4",
                 "--prompt-len", "uniform:2:5", "--tenant", "good", "--per-request", per_request)
    t = totals()
    lines = [json.loads(l) for l in open(per_request)]
    os.unlink(per_request)
    check(len(lines) == 12, "one line per request", len(lines))
    check(sum(len(l["itl_s"]) for l in lines) == r["itl_ms"]["count"], "the lines hold the report's gaps")
    check(all(l["ttft_s"] >= FIRST_DELAY_S * 0.9 and l["output_tokens"] == 4 and "failure" not in l for l in lines),
          "each line's TTFT and tokens", lines[0])
    # A request's start, first token and gaps add up to its end (the stream's last chunk is usage).
    check(all(l["start_s"] + l["ttft_s"] + sum(l["itl_s"]) <= l["end_s"] + 1e-6 for l in lines), "times add up")
    check(sorted(l["start_s"] for l in lines)[-1] > 0.05, "starts spread by the arrivals")
    check(p.returncode == 0, "rate run succeeds", p.stdout, p.stderr)
    check(not STATS.problems and STATS.models_listed == 0, "chat requests well-formed", STATS.problems[:3])
    check(STATS.posts == {"/v1/chat/completions": 12}, "all went to the chat endpoint", STATS.posts)
    check(r["requests"]["ok"] == 12 and r["output_tokens"] == 48 == t["tokens"], "chat tokens", r["requests"])
    check(r["itl_ms"]["count"] == t["gaps"], "the empty role delta is not a token", r["itl_ms"], t["gaps"])
    check(r["config"]["mode"] == "rate", "the report says open loop")

    # Not streamed: exact tokens from usage, no TTFT / ITL.
    STATS.reset()
    p, r = bench(moemesh, url, "--no-stream", "--concurrency", "2", "--requests", "5", "--output-len", "5",
                 "--text-prompts")
    check(p.returncode == 0, "no-stream run succeeds", p.stderr)
    check(not STATS.problems, "text prompts well-formed", STATS.problems[:3])
    check(r["requests"]["ok"] == 5 and r["output_tokens"] == 25, "no-stream tokens", r["requests"], r["output_tokens"])
    check(r["ttft_ms"] is None and r["itl_ms"] is None and r["e2e_ms"]["count"] == 5, "no TTFT without a stream")

    # A time limit instead of a count: the arrivals before 0.5 s, whatever their number.
    STATS.reset()
    p, r = bench(moemesh, url, "--rate", "30", "--duration-s", "0.5", "--model", MODEL, "--output-len", "3")
    check(p.returncode == 0 and 2 <= r["requests"]["total"] <= 40, "duration run", r and r["requests"], p.stderr)
    check(r["requests"]["total"] == totals()["requests"] == r["requests"]["ok"], "every arrival was served")

    # Our deadline: a stream that stalls is a timeout.
    p, r = bench(moemesh, url, "--concurrency", "2", "--requests", "2", "--model", MODEL, "--tenant", "slow",
                 "--timeout-s", "0.3")
    check(p.returncode != 0 and r["failures"] == {"timeout": 2}, "stalled streams time out", r and r["failures"])
    check("every request failed" in p.stderr, "all failed is an error", p.stderr)

    # Nobody listening: every request fails as connection_refused, and the run says so.
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    p, r = bench(moemesh, dead, "--concurrency", "3", "--requests", "6", "--model", MODEL)
    check(p.returncode != 0 and r["failures"] == {"connection_refused": 6}, "refused connections counted", r)
    p, _ = bench(moemesh, dead, "--concurrency", "1")
    check(p.returncode != 0 and "/v1/models" in p.stderr, "model discovery failure is explained", p.stderr)

    # Bad flags are refused before any request.
    for args, msg in ((["--rate", "1", "--concurrency", "2"], "excludes"),
                      (["--requests", "3"], "give exactly one of --rate R"),
                      (["--rate", "1", "--output-len", "uniform:9:3"], "1 <= A <= B"),
                      (["--rate", "1", "--tenant", "k:0"], "weight must be > 0")):
        p, _ = bench(moemesh, url, "--model", MODEL, *args)
        check(p.returncode != 0 and msg in p.stderr, f"refused: {' '.join(args)}", p.stderr)
    print("bench_fake_server: all passed")


if __name__ == "__main__":
    main()
