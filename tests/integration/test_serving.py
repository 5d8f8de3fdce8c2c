#!/usr/bin/env python3
"""serving: the OpenAI API's streaming and generation options against a real cluster.

- /v1/completions streamed (SSE, include_usage) gives the same text and usage as unstreamed,
  and curl sees well-formed `data:` events ending in `data: [DONE]`;
- stop strings end the text right before their first match, also when split across tokens, in
  both modes; n choices are indexed, seeded and counted in usage; logprobs have OpenAI's shapes;
- /v1/chat/completions (the checkpoint's chat template) streamed and not, with chat logprobs;
- a client that hangs up mid-stream cancels its request: the attention worker's KV blocks
  return to free and the router counts it as 499/cancelled;
- a request is placed on the attention worker that holds its prompt's prefix (prefix affinity);
- 64 concurrent streaming requests on the small model all complete with correct usage, and
  greedy outputs equal those of the same requests sent one at a time.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def kv_used(p):
    for line in p.metrics().splitlines():
        if line.startswith("moemesh_attention_kv_blocks{") and 'state="used"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def counter(p, name, **labels):
    total = 0.0
    for line in p.metrics().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def completions_stream_matches(c):
    body = {"prompt": list(range(5, 25)), "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    st, plain = c.complete(body)
    H.check(st == 200, f"completion: {st} {plain}")
    text = plain["choices"][0]["text"]
    st, ev = H.stream(c.api_port, COMPLETIONS, dict(body, stream=True, stream_options={"include_usage": True}))
    H.check(st == 200 and ev and ev[-1] == "[DONE]", f"stream did not end with [DONE]: {st} {ev[-3:]}")
    H.check(H.stream_text(ev) == text, f"streamed text {H.stream_text(ev)!r} != unstreamed {text!r}")
    usage = ev[-2]
    H.check(usage["choices"] == [] and usage["usage"]["completion_tokens"] == 24 and
            usage["usage"]["prompt_tokens"] == 20, f"usage chunk: {usage}")
    finals = [ch["finish_reason"] for e in ev[:-2] for ch in e["choices"]]
    H.check(finals[-1] == "length" and all(f is None for f in finals[:-1]), f"finish reasons {finals}")
    H.check(all(e["object"] == "text_completion" and e["id"] == ev[0]["id"] for e in ev[:-1]), "chunk ids/objects")
    return body, text


def raw_sse_with_curl(c, body, text):
    # The bytes on the wire, as curl -N shows them: "data: {json}" events separated by blank lines,
    # ending with "data: [DONE]".
    curl = shutil.which("curl")
    H.check(curl, "curl is not installed (scripts/bootstrap installs it)")
    out = subprocess.run([curl, "-sN", "-H", "Content-Type: application/json", "-d",
                          json.dumps(dict(body, stream=True)), f"http://127.0.0.1:{c.api_port}{COMPLETIONS}"],
                         capture_output=True, text=True, timeout=60).stdout
    events = [e for e in out.split("\n\n") if e]
    H.check(all(e.startswith("data: ") and "\n" not in e for e in events), f"not SSE events: {out[:300]!r}")
    H.check(events[-1] == "data: [DONE]", f"curl's stream ends with {events[-1]!r}")
    streamed = "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-1])
    H.check(streamed == text, f"curl's streamed text {streamed!r} != {text!r}")


def stop_strings(c, body, text):
    # A stop string from the middle of the text, long enough to span tokens in most cases.
    probe = [(i, text[i:i + 4]) for i in range(3, len(text) - 4) if text[i:i + 4].strip()]
    H.check(probe, f"no usable stop string in {text!r}")
    _, stop = probe[len(probe) // 2]
    cut = text.index(stop)
    st, ans = c.complete(dict(body, stop=[stop, "never-in-text-xyz"], return_token_ids=True))
    H.check(st == 200, f"stop: {st} {ans}")
    ch = ans["choices"][0]
    H.check(ch["text"] == text[:cut] and ch["finish_reason"] == "stop",
            f"stop {stop!r}: got {ch['text']!r} ({ch['finish_reason']}), want {text[:cut]!r}")
    H.check(ans["usage"]["completion_tokens"] == len(ch["token_ids"]) < 24, f"stop usage: {ans['usage']}")
    st, ev = H.stream(c.api_port, COMPLETIONS, dict(body, stop=stop, stream=True))
    H.check(H.stream_text(ev) == text[:cut], f"streamed stop: {H.stream_text(ev)!r} != {text[:cut]!r}")
    H.check(ev[-2]["choices"][0]["finish_reason"] == "stop", f"streamed stop finish: {ev[-2]}")


def n_and_logprobs(c):
    body = {"prompt": [3, 1, 4, 1, 5], "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 3,
            "ignore_eos": True, "logprobs": 2}
    st, a = c.complete(body)
    H.check(st == 200 and [ch["index"] for ch in a["choices"]] == [0, 1, 2], f"n=3: {st} {a}")
    H.check(a["usage"]["completion_tokens"] == 18, f"n=3 usage: {a['usage']}")
    _, b = c.complete(body)
    H.check([ch["text"] for ch in a["choices"]] == [ch["text"] for ch in b["choices"]], "seeded n=3 differs on resend")
    for ch in a["choices"]:
        lp = ch["logprobs"]
        H.check(len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6, f"logprobs: {lp}")
        H.check(all(len(t) <= 2 for t in lp["top_logprobs"]) and all(v <= 0 for v in lp["token_logprobs"]),
                f"logprobs values: {lp}")
        H.check(all(isinstance(t, str) for t in lp["tokens"]) and lp["text_offset"] == sorted(lp["text_offset"]),
                f"logprobs tokens must be strings with increasing text offsets: {lp}")
    st, g = c.complete({"prompt": [3, 1, 4], "max_tokens": 4, "temperature": 0, "logprobs": 1, "ignore_eos": True})
    lp = g["choices"][0]["logprobs"]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        H.check(abs(max(top.values()) - chosen) < 1e-5, f"greedy token is not the top-1 logprob: {chosen} {top}")


def chat(c):
    body = {"messages": [{"role": "user", "content": "Hello there!"}],
            "max_completion_tokens": 10, "temperature": 0, "ignore_eos": True}
    st, a = H.http(c.api_port, CHAT, body)
    H.check(st == 200 and a["object"] == "chat.completion", f"chat: {st} {a}")
    msg = a["choices"][0]["message"]
    H.check(msg["role"] == "assistant" and isinstance(msg["content"], str), f"chat message: {msg}")
    H.check(a["usage"]["prompt_tokens"] > 5 and a["usage"]["completion_tokens"] == 10, f"chat usage: {a['usage']}")
    st, ev = H.stream(c.api_port, CHAT, dict(body, stream=True, stream_options={"include_usage": True}))
    H.check(st == 200 and ev[0]["object"] == "chat.completion.chunk", f"chat stream: {st} {ev[:1]}")
    H.check(ev[0]["choices"][0]["delta"].get("role") == "assistant", f"first delta: {ev[0]}")
    H.check(H.stream_text(ev, chat=True) == msg["content"], "streamed chat content differs from unstreamed")
    H.check(ev[-2]["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"], f"chat usage chunk: {ev[-2]}")
    st, lp = H.http(c.api_port, CHAT, dict(body, logprobs=True, top_logprobs=2))
    content = lp["choices"][0]["logprobs"]["content"]
    H.check(len(content) == 10 and all({"token", "logprob", "bytes", "top_logprobs"} <= set(t) for t in content),
            f"chat logprobs: {content[:2]}")
    st, e = H.http(c.api_port, CHAT, {"messages": [{"role": "user", "content": "x"}], "prompt": "y"})
    H.check(st == 400 and e["error"]["type"] == "invalid_request_error", f"chat with a prompt: {st} {e}")
    st, e = H.http(c.api_port, CHAT, {"messages": [], "stream": True})
    H.check(st == 400 and e["error"]["param"] == "messages", f"empty messages streamed: {st} {e}")


def disconnect_frees_kv(c):
    att = c.attention[0]
    body = {"prompt": list(range(1, 40)), "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    st, ev = H.stream(c.api_port, COMPLETIONS, body, stop_after=3)
    H.check(st == 200 and len(ev) == 3, f"stream before hanging up: {st} {ev}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (kv_used(att) or counter(c.router, "moemesh_router_requests_total",
                                                                    status="499") < 1):
        time.sleep(0.1)
    H.check(kv_used(att) == 0, f"KV blocks still used after the client left: {kv_used(att)}")
    H.check(counter(c.router, "moemesh_router_requests_total", status="499", finish_reason="cancelled") == 1,
            "the router did not count the hang-up as 499/cancelled")
    H.check(counter(c.router, "moemesh_router_completion_tokens_total") < 300, "the cancelled request ran on")


def prefix_affinity(c):
    # Two prompts with distinct 48-token prefixes, sent together, land on the two workers. Sent
    # again (new suffixes, one at a time), each must go back to the worker that holds its prefix:
    # there is no KV store here, so a hit can only come from that worker's memory tier.
    prefixes = [[(i * 31 + j * 7) % 400 + 2 for j in range(48)] for i in (1, 2)]
    first = H.run_in_threads(lambda p: c.complete({"prompt": p + [9], "max_tokens": 24, "ignore_eos": True}), prefixes)
    H.check(all(st == 200 for st, _ in first), f"affinity first round: {first}")
    for p in prefixes:
        st, a = c.complete({"prompt": p + [11, 12], "max_tokens": 2})
        H.check(st == 200 and a["usage"]["prompt_tokens_details"]["cached_tokens"] == 48,
                f"a request sharing a 48-token prefix was not placed where that prefix is cached: {a}")
    hits = [p.metric("moemesh_attention_prefix_cache_hit_tokens_total") for p in c.attention]
    H.check(hits == [48, 48], f"prefix hits per worker {hits}: both workers should have served one prefix")


def concurrent_streams(args, tmp, cli):
    model = cli.mkmodel("mixtral", os.path.join(tmp, "small-mixtral"), seed=4, preset="small")
    bodies = [{"prompt": [(7 * i + j) % 500 + 1 for j in range(6 + i % 13)], "max_tokens": 12 + i % 5,
               "temperature": 0, "ignore_eos": True} for i in range(64)]
    with H.Cluster(args, tmp, model, tag="streams") as c:
        c.up(attention=2, experts=2)
        c.wait_scheduler_connected()
        prefix_affinity(c)
        alone = []
        for b in bodies:
            st, a = c.complete(b)
            H.check(st == 200, f"sequential request: {st} {a}")
            alone.append(a["choices"][0]["text"])
        t0 = time.monotonic()
        res = H.run_in_threads(lambda b: H.stream(c.api_port, COMPLETIONS, dict(
            b, stream=True, stream_options={"include_usage": True}), timeout=120), bodies)
        H.log(f"64 concurrent streams done in {time.monotonic() - t0:.1f} s")
        for i, (st, ev) in enumerate(res):
            H.check(st == 200 and ev[-1] == "[DONE]", f"stream {i}: {st} {ev[-2:]}")
            u = ev[-2]["usage"]
            H.check(u["completion_tokens"] == bodies[i]["max_tokens"] and u["prompt_tokens"] == len(bodies[i]["prompt"]),
                    f"stream {i} usage {u}")
            H.check(H.stream_text(ev) == alone[i], f"stream {i}: {H.stream_text(ev)!r} != alone {alone[i]!r}")
        c.check_all_alive()


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=3)
    with H.Cluster(args, tmp, model, tag="serving") as c:
        c.up(attention=1, experts=2)
        c.wait_scheduler_connected()
        body, text = completions_stream_matches(c)
        raw_sse_with_curl(c, body, text)
        stop_strings(c, body, text)
        n_and_logprobs(c)
        chat(c)
        disconnect_frees_kv(c)
        c.check_all_alive()
    H.log("serving: streaming, stop strings, n, logprobs, chat and hang-up cancellation behave")
    concurrent_streams(args, tmp, cli)
    H.log("serving: 64 concurrent streams match the one-at-a-time outputs")


if __name__ == "__main__":
    H.main(test)
