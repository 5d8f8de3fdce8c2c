#!/usr/bin/env python3
"""tenants: with --tenants the router asks for an API key (401 without or with a wrong one),
enforces each tenant's limits (max_tokens 400, models 404, requests per minute 429 with
Retry-After), serves a valid key, and on SIGHUP reloads the file: a key added to it works at
once, a removed one stops working, and requests keep being served meanwhile.
"""
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402


def call(c, key, body):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return H.http(c.api_port, "/v1/completions", body, headers=headers)


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=6)
    path = os.path.join(tmp, "tenants.json")
    H.tenants_file(path, cli, [("acme", ["key-acme"], {"max_tokens": 8, "requests_per_minute": 3}),
                             ("beta", ["key-beta"], {"models": ["another-model"]})])
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    with H.Cluster(args, tmp, model, tag="tenants") as c:
        c.up(attention=1, experts=1, router_extra=("--tenants", path))
        st, ans = call(c, None, body)
        H.check(st == 401 and ans["error"]["code"] == "invalid_api_key", f"no key: {st} {ans}")
        st, ans = call(c, "nope", body)
        H.check(st == 401, f"wrong key: {st} {ans}")
        st, ans = call(c, "key-acme", dict(body, max_tokens=9))
        H.check(st == 400 and ans["error"]["param"] == "max_tokens", f"over max_tokens: {st} {ans}")
        st, ans = call(c, "key-beta", body)
        H.check(st == 404, f"model not allowed for beta: {st} {ans}")
        # acme: 3 requests per minute. The refused max_tokens request above took none.
        for i in range(3):
            st, ans = call(c, "key-acme", body)
            H.check(st == 200 and len(ans["choices"][0]["token_ids"]) == 4, f"acme request {i}: {st} {ans}")
        req = urllib.request.Request(
            f"http://127.0.0.1:{c.api_port}/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json", "Authorization": "Bearer key-acme"})
        try:
            urllib.request.urlopen(req, timeout=30)
            H.check(False, "the 4th request within a minute was accepted")
        except urllib.error.HTTPError as e:
            H.check(e.code == 429, f"4th request: HTTP {e.code}")
            retry = int(e.headers.get("Retry-After", "0"))
            H.check(1 <= retry <= 20, f"Retry-After {retry}, expected about 20 s (one request refills in 60/3 s)")
            err = json.loads(e.read())["error"]
            H.check(err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded", f"429 body: {err}")

        # Reload: acme's key is replaced by a new one, beta may now use the served model.
        H.tenants_file(path, cli, [("acme", ["key-acme-2"], {"max_tokens": 8}),
                                 ("beta", ["key-beta"], {"models": ["*"]})])
        c.router.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st, _ = call(c, "key-acme-2", body)
            if st == 200:
                break
            time.sleep(0.2)
        H.check(st == 200, f"the new key did not work after SIGHUP: {st}")
        st, _ = call(c, "key-acme", body)
        H.check(st == 401, f"the removed key still works after SIGHUP: {st}")
        st, ans = call(c, "key-beta", body)
        H.check(st == 200, f"beta after reload: {st} {ans}")
        # A broken file is refused and the old tenants stay.
        with open(path, "w") as f:
            f.write("{broken")
        c.router.popen.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        st, _ = call(c, "key-beta", body)
        H.check(st == 200, f"a broken tenants file on reload changed the tenants: {st}")
        c.check_all_alive()
    H.log("tenants: keys, limits, 429 with Retry-After and SIGHUP reload all behave")


if __name__ == "__main__":
    H.main(test)
