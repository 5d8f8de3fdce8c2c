#!/usr/bin/env python3
"""bad_requests: the router's OpenAI API answers bad requests with OpenAI-shaped errors
({"error": {"message", "type", "param", "code"}}): 400 for bad JSON and bad parameters (naming
the parameter), 404 for an unknown model, 400 for a prompt longer than the context or than any
worker's KV cache, 503 when no attention worker is ready; GET /v1/models lists the served model (the folder's name, or --served-model-name). A prompt
of three KV blocks is still served afterwards, and matches the reference.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def expect_error(c, name, body, status, param=None, type_="invalid_request_error", code=None, raw=None,
                 message_has=None):
    if raw is not None:
        got, ans = H.http(c.api_port, "/v1/completions", raw_body=raw, headers={"Content-Type": "application/json"})
    else:
        got, ans = c.complete(body)
    H.check(got == status, f"{name}: HTTP {got}, expected {status}: {ans!r}"[:600])
    H.check(isinstance(ans, dict) and isinstance(ans.get("error"), dict),
            f"{name}: the body is not an OpenAI error object: {ans!r}"[:600])
    e = ans["error"]
    for k in ("message", "type", "param", "code"):
        H.check(k in e, f"{name}: the error has no '{k}': {e}")
    H.check(isinstance(e["message"], str) and e["message"], f"{name}: empty error message: {e}")
    H.check(e["type"] == type_, f"{name}: error type {e['type']!r}, expected {type_!r}: {e}")
    if param is not None:
        H.check(e["param"] == param, f"{name}: error param {e['param']!r}, expected {param!r}: {e}")
    if code is not None:
        H.check(e["code"] == code, f"{name}: error code {e['code']!r}, expected {code!r}: {e}")
    if message_has is not None:
        H.check(message_has in e["message"], f"{name}: message {e['message']!r} does not mention {message_has!r}")
    return e


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=5)
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    ctx, vocab = cfg["max_position_embeddings"], cfg["vocab_size"]

    with H.Cluster(args, tmp, model, tag="bad") as c:
        c.up(attention=1, experts=1, attention_extra=("--kv-blocks", "64"))  # 1024 tokens of KV
        ok = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}

        # /v1/models: the folder's name.
        st, ans = H.http(c.api_port, "/v1/models")
        H.check(st == 200, f"/v1/models: HTTP {st}: {ans}")
        ids = [m.get("id") for m in ans.get("data", [])]
        H.check(ids == ["tiny-mixtral"], f"/v1/models lists {ids}, expected ['tiny-mixtral']")
        H.check(ans.get("object") == "list", f"/v1/models: object {ans.get('object')!r}, expected 'list'")

        # Malformed bodies.
        expect_error(c, "bad JSON", None, 400, raw=b'{"prompt": [1, 2, 3], "max_tokens": ')
        expect_error(c, "not JSON at all", None, 400, raw=b"\x00\xff\xfe garbage")
        expect_error(c, "empty body", None, 400, raw=b"")
        expect_error(c, "JSON array body", None, 400, raw=b"[1, 2, 3]")

        # Bad parameters: each error names its parameter.
        bad = [
            ("missing prompt", {"max_tokens": 2}, "prompt"),
            ("empty prompt", {"prompt": ""}, "prompt"),
            ("empty id list", {"prompt": []}, "prompt"),
            ("negative token id", {"prompt": [1, -2]}, "prompt"),
            ("token id past the vocabulary", {"prompt": [1, vocab]}, "prompt"),
            ("prompt of the wrong type", {"prompt": {"a": 1}}, "prompt"),
            ("max_tokens 0", {"prompt": [1], "max_tokens": 0}, "max_tokens"),
            ("max_tokens a string", {"prompt": [1], "max_tokens": "8"}, "max_tokens"),
            ("temperature too high", {"prompt": [1], "temperature": 7}, "temperature"),
            ("temperature a string", {"prompt": [1], "temperature": "hot"}, "temperature"),
            ("top_p 0", {"prompt": [1], "top_p": 0}, "top_p"),
            ("top_p over 1", {"prompt": [1], "top_p": 1.5}, "top_p"),
            ("seed a string", {"prompt": [1], "seed": "seven"}, "seed"),
            ("seed a float", {"prompt": [1], "seed": 1.5}, "seed"),
            ("stop_token_ids not a list", {"prompt": [1], "stop_token_ids": 3}, "stop_token_ids"),
            ("model not a string", {"prompt": [1], "model": 3}, "model"),
            ("return_logits not a boolean", {"prompt": [1], "return_logits": "yes"}, "return_logits"),
            ("n 0", {"prompt": [1], "n": 0}, "n"),
            ("n 17", {"prompt": [1], "n": 17}, "n"),
            ("five stop strings", {"prompt": [1], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
            ("stop not a string", {"prompt": [1], "stop": 5}, "stop"),
            ("stream_options without stream", {"prompt": [1], "stream_options": {"include_usage": True}},
             "stream_options"),
            ("unknown priority", {"prompt": [1], "priority": "urgent"}, "priority"),
            ("logprobs 21", {"prompt": [1], "logprobs": 21}, "logprobs"),
            ("echo", {"prompt": [1], "echo": True}, "echo"),
            ("bad parameter on a stream (JSON, not SSE)", {"prompt": [1], "stream": True, "top_p": 2}, "top_p"),
        ]
        for name, body, param in bad:
            expect_error(c, name, body, 400, param=param)

        # Unknown model.
        expect_error(c, "unknown model", dict(ok, model="gpt-17"), 404, param="model", code="model_not_found",
                     message_has="gpt-17")

        # Longer than the context.
        expect_error(c, "prompt over the context", {"prompt": [5] * (ctx + 1), "max_tokens": 1}, 400, param="prompt",
                     message_has=str(ctx))
        expect_error(c, "prompt + max_tokens over the context", {"prompt": [5] * (ctx - 10), "max_tokens": 11}, 400,
                     param="prompt", message_has=str(ctx))
        expect_error(c, "text prompt over the context", {"prompt": "hello world " * ctx, "max_tokens": 1}, 400,
                     param="prompt", message_has=str(ctx))

        # Within the context but more than any worker's KV cache: refused at once, not after retries.
        e = expect_error(c, "prompt + max_tokens over the KV cache", {"prompt": [5] * 1000, "max_tokens": 100}, 400,
                         param="prompt", message_has="KV cache")
        H.check("1024" in e["message"], f"the KV error does not say the capacity: {e}")

        # After all that, the served model by name and a prompt that fills the context exactly.
        st, ans = c.complete(dict(ok, model="tiny-mixtral", return_token_ids=True))
        H.check(st == 200, f"a good request after the bad ones: HTTP {st}: {ans}")
        H.check(ans.get("model") == "tiny-mixtral", f"the answer names model {ans.get('model')!r}")
        # ... and a longer prompt (three KV blocks) still matches the reference.
        prompt = [(i * 7919) % (vocab - 3) + 2 for i in range(40)]
        st, ans = c.complete({"prompt": prompt, "max_tokens": 3, "temperature": 0, "return_token_ids": True,
                              "return_logits": True})
        H.check(st == 200, f"a 40-token prompt after the bad requests: HTTP {st}: {str(ans)[:300]}")
        H.compare_with_reference("40-token prompt", ans["choices"][0], cli.generate(model, prompt_ids=prompt, max_tokens=3))
        c.check_all_alive()

        # --served-model-name: a second router (no workers needed for /v1/models).
        c2 = H.Cluster(args, tmp, model, tag="named")
        with c2:
            c2.start_router(1, extra=("--served-model-name", "my-moe"))
            c2.router.wait_log(r"router: serving")
            st, ans = H.http(c2.api_port, "/v1/models")
            ids = [m.get("id") for m in ans.get("data", [])] if isinstance(ans, dict) else ans
            H.check(st == 200 and ids == ["my-moe"], f"--served-model-name my-moe: /v1/models HTTP {st} lists {ids}")
            expect_error(c2, "folder name after --served-model-name", dict(ok, model="tiny-mixtral"), 404,
                         param="model", code="model_not_found")
            # No attention worker has joined this router: not ready, 503 at once (not a hang).
            expect_error(c2, "no attention worker", ok, 503, type_="server_error", message_has="no attention worker")
            raw = H.raw_http(c2.api_port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n"
                             b'{"prompt": [1], "n": 1}    ')
            H.check(H.status_of(raw) == 503 and b"\r\nretry-after: 1\r\n" in raw.lower(),
                    f"a 503 without Retry-After: {raw[:300]!r}")
    H.log("bad requests: every answer was the expected OpenAI error")


if __name__ == "__main__":
    H.main(test)
