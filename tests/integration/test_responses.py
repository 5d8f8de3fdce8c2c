#!/usr/bin/env python3
"""responses: the Responses API against a cluster with two tenants (private prefix caches) and
--keep-turns 5, driven by the official `openai` npm client (responses_client.mjs): plain and
streamed responses, a 6-turn conversation that gives the model only its last 5 turns and reuses
cached KV from turn 2, tenants' responses kept apart, retrieve / input items / delete; then the
router restarted on the same --responses-dir still continues the conversation.
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test(args, tmp):
    node_modules = H.node_packages(args, "openai")
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=4)
    tenants = H.tenants_file(os.path.join(tmp, "tenants.json"), cli,
                             [("acme", ["key-acme"], {}), ("globex", ["key-globex"], {})])
    store = os.path.join(tmp, "responses")
    with H.Cluster(args, tmp, model, tag="responses") as c:
        c.up(attention=1, experts=1, router_extra=("--tenants", tenants, "--responses-dir", store, "--keep-turns", "5"))
        p = subprocess.run(["node", os.path.join(HERE, "responses_client.mjs"), f"http://127.0.0.1:{c.api_port}",
                            "tiny-mixtral", "key-acme", "key-globex"],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, NODE_PACKAGES=node_modules))
        print(p.stdout, p.stderr, flush=True)
        H.check(p.returncode == 0 and "responses: OK" in p.stdout, "the responses client run failed (above)")
        ids = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("create:")]
        H.check(len(ids) == 1, "the first response's id is printed")
        c.check_all_alive()

    # A new router (a restart) on the same folder still has the stored responses.
    with H.Cluster(args, tmp, model, tag="restarted") as c:
        c.up(attention=1, experts=1, router_extra=("--tenants", tenants, "--responses-dir", store))
        auth = {"Authorization": "Bearer key-acme"}
        st, body = H.http(c.api_port, f"/v1/responses/{ids[0]}", method="GET", headers=auth)
        H.check(st == 200 and body["id"] == ids[0], f"stored response lost on restart: {st} {body}")
        st, body = H.http(c.api_port, "/v1/responses",
                          {"input": "and then?", "previous_response_id": ids[0], "max_output_tokens": 3}, headers=auth)
        H.check(st == 200 and body["previous_response_id"] == ids[0], f"continuing after restart: {st} {body}")
        st, _ = H.http(c.api_port, f"/v1/responses/{ids[0]}", method="GET", headers={"Authorization": "Bearer key-globex"})
        H.check(st == 404, f"another tenant read it: {st}")


if __name__ == "__main__":
    H.main(test, lambda p: p.add_argument("--cache-dir", required=True))
