#!/usr/bin/env python3
"""garbage_to_every_port: random bytes, broken ZMTP handshakes, truncated and oversized frames,
wrong-version / wrong-magic / wrong-kind / truncated data-plane headers to every ZeroMQ port of a
running cluster (router control and placement, attention step socket, expert hosts, KV store),
and garbage HTTP (not HTTP, half a request, bad JSON, wrong content type, huge bodies, huge
headers, idle connections) to the router's API and admin ports.

Every well-framed bad data-plane message must get an Error reply (wire kind 8, the request id
echoed when the header was readable); the coordinator must still answer a StatusRequest; every
process stays up, every /readyz stays 200, and a correct completion still matches the reference.
"""
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

rng = random.Random(1234)


def rand_bytes(n):
    return bytes(rng.getrandbits(8) for _ in range(n))


def unparsable_protobuf(n):
    # Wire type 7 does not exist: a protobuf parser must reject this whatever follows.
    return b"\x07" + rand_bytes(n - 1)


# ---- ZMTP-level abuse: the handshake and the framing ------------------------------------------


def zmtp_attacks(endpoint):
    """Each opens a connection, misbehaves, closes. None may take the process down."""
    G = H.Zmtp.greeting

    def raw(data, handshake=False, sock_type=b"DEALER"):
        def go():
            try:
                with H.Zmtp(endpoint, timeout=2, handshake=handshake, socket_type=sock_type) as z:
                    z.send_raw(data)
                    time.sleep(0.02)
            except (OSError, H.TestFailure):
                pass  # the peer may close on us: that is fine
        return go

    def bad_socket_type():
        try:
            with H.Zmtp(endpoint, timeout=2, socket_type=b"PUB") as z:
                z.send(b"hello")
        except (OSError, H.TestFailure, ConnectionError):
            pass

    return [
        ("random bytes, no greeting", raw(rand_bytes(2048))),
        ("an HTTP request", raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
        ("half a greeting", raw(G()[:20])),
        ("greeting of ZMTP 9.9", raw(G((9, 9)) + rand_bytes(64))),
        ("greeting of ZMTP 1.0", raw(b"\x01\x00" + rand_bytes(64))),
        ("greeting, unknown mechanism", raw(G().replace(b"NULL", b"BOGU") + rand_bytes(64))),
        ("greeting, then random bytes", raw(G() + rand_bytes(512))),
        ("a PUB socket's READY", bad_socket_type),
        ("a frame declaring 1000 bytes, 10 sent", raw(b"\x00\xe8" + rand_bytes(10), handshake=True)),
        ("a long frame declaring 2^62 bytes", raw(b"\x02" + (1 << 62).to_bytes(8, "big") + b"abc", handshake=True)),
        ("a long frame declaring 1 GiB, 100 bytes sent",
         raw(b"\x02" + (1 << 30).to_bytes(8, "big") + rand_bytes(100), handshake=True)),
        ("an unknown command", raw(H.Zmtp.frame(b"\x05BOGUS" + rand_bytes(20), command=True), handshake=True)),
        ("a malformed command", raw(b"\x04\x05\xff" + rand_bytes(4), handshake=True)),
        ("reserved flag bits", raw(b"\xf8\x03abc", handshake=True)),
    ]


# ---- message-level abuse: well-framed ZeroMQ messages with bad contents -----------------------


def dataplane_messages(good_kind):
    """(name, frames, request id the error reply should echo, or None) for a data-plane ROUTER."""
    W = H.wire_header
    other_kind = H.KIND_STEP_RESPONSE if good_kind != H.KIND_STEP_RESPONSE else H.KIND_DISPATCH_RESPONSE
    return [
        ("an empty frame", [b""], None),
        ("random bytes", [rand_bytes(300)], None),
        ("a truncated header (20 bytes)", [W(good_kind, 11)[:20]], None),
        ("wire version 2", [W(good_kind, 12, version=2)], 12),
        ("wire version 0", [W(good_kind, 13, version=0)], 13),
        ("bad magic", [W(good_kind, 14, magic=0xDEADBEEF)], 14),
        ("unknown kind 99", [W(99, 15)], 15),
        ("the wrong kind", [W(other_kind, 16)], 16),
        ("meta_len past the frame", [W(good_kind, 17, meta=b"ab", meta_len=1000)], 17),
        ("meta_len 2 GiB", [W(good_kind, 18, meta_len=1 << 31)], 18),
        ("65535 tensors declared", [W(good_kind, 19, n_tensors=65535)], 19),
        ("a tensor declared, none sent", [W(good_kind, 20, tensors=[(0, [4, 64])])], 20),
        ("a tensor frame shorter than declared", [W(good_kind, 21, tensors=[(0, [4, 64])]), b"\0" * 100], 21),
        ("a tensor of 2^40 x 2^40 elements", [W(good_kind, 22, tensors=[(0, [1 << 40, 1 << 40])])], 22),
        ("a negative dimension", [W(good_kind, 23, tensors=[(0, [-1])]), b""], 23),
        ("an unknown dtype", [W(good_kind, 24, tensors=[(200, [1])]), b"\0"], 24),
        ("rank 9", [W(good_kind, 25, tensors=[(0, [1] * 9)])], 25),
        ("an extra frame", [W(good_kind, 26), b"extra"], 26),
        ("unparsable metadata", [W(good_kind, 27, meta=unparsable_protobuf(64))], 27),
        ("100 frames", [W(good_kind, 28)] + [b"x"] * 99, 28),
    ]


def check_error_reply(where, name, reply, request_id):
    H.check(reply, f"{where}: no reply to {name}")
    h = H.parse_wire_header(reply[0])
    H.check(h is not None and h["magic"] == H.WIRE_MAGIC, f"{where}: the reply to {name} is not a wire frame: "
                                                            f"{reply[0][:48]!r}")
    H.check(h["kind"] == H.KIND_ERROR, f"{where}: the reply to {name} has kind {h['kind']}, expected Error (8)")
    # Whether the request id is echoed is reported, not required: every service answers a header
    # it could not decode with request id 0 (wire::decode throws before returning the header).
    return request_id is None or h["request_id"] == request_id


def attack_dataplane(where, endpoint, good_kind):
    msgs = dataplane_messages(good_kind)
    echoed = 0
    with H.Zmtp(endpoint, timeout=5) as z:
        for name, frames, rid in msgs:
            z.send(*frames)
            try:
                reply = z.recv(timeout=5)
            except (socket.timeout, TimeoutError):
                raise H.TestFailure(f"{where}: no error reply within 5 s to {name} (the contract: every bad frame "
                                    f"gets an error reply)")
            echoed += check_error_reply(where, name, reply, rid)
    H.log(f"{where}: {len(msgs)} bad messages, {len(msgs)} error replies ({echoed} name the request id or "
          f"had none to name)")


def attack_control(c):
    # The coordinator's control ROUTER: bad protobufs, wrong frame counts, data-plane frames.
    msgs = [[b""], [unparsable_protobuf(100)], [b"\x0a\xff\xff\xff\xff\x0f"],  # a length past the end
            [H.wire_header(1, 1, version=2)], [b"a", b"b", b"c"], [unparsable_protobuf(70000)]]
    with H.Zmtp(c.control, timeout=5) as z:
        for frames in msgs:
            z.send(*frames)
        # Still answering: a StatusRequest gets a ControlMessage{status} (field 6).
        reply = z.request(H.STATUS_REQUEST, timeout=5)
    H.check(len(reply) == 1, f"router control: status reply of {len(reply)} frames")
    fields = H.pb_fields(reply[0])
    H.check(fields and fields[0][0] == 6, f"router control: the reply to a StatusRequest is not a status: {fields[:3]}")
    H.log(f"router control: {len(msgs)} bad control messages, then a status reply of {len(reply[0])} bytes")


def attack_placement(c):
    # The PUB socket: a SUB peer that sends garbage subscriptions and non-subscription frames.
    try:
        with H.Zmtp(c.placement, timeout=2, socket_type=b"SUB") as z:
            z.send(b"\x01")                        # subscribe to everything
            z.send(rand_bytes(100))                # neither subscribe nor cancel
            z.send(b"")                            # empty
            z.send(b"\x00" + rand_bytes(10), b"x")  # multipart
            z.send_raw(b"\x02" + (1 << 62).to_bytes(8, "big"))
            time.sleep(0.05)
    except (OSError, ConnectionError):
        pass


# ---- HTTP ------------------------------------------------------------------------------------


def http_attacks(port, api):
    """(name, raw request, acceptable statuses or None for 'any answer or a close')."""
    post = lambda body, ctype="application/json", extra="": (  # noqa: E731
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n").encode() + body
    attacks = [
        ("random bytes", rand_bytes(4096), {400, None}),
        ("a lone CRLF", b"\r\n\r\n", {400, None}),
        ("half a request line", b"POST /v1/compl", {400, 408, None}),
        ("headers without the end", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", {400, 408, None}),
        ("a body shorter than Content-Length",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"", {400, 408, None}),
        ("a bad Content-Length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", {400}),
        ("bad chunked encoding",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", {400}),
        ("HTTP/9.9", b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505, None}),
        ("a 200 KB header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200000 + b"\r\n\r\n",
         {400, 413, 431, None}),
        ("Content-Length 100 MB (1 MB sent)",
         b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000"
         b"\r\n\r\n" + b"[" * 1000000, {413, None}),
        ("a 9 MB body", post(b'{"prompt": "' + b"a" * (9 << 20) + b'"}'), {413, None}),
        ("an unknown method", b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
         {400, 404, 405, 501}),
        ("an unknown path", b"GET /v1/nothing/here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", {404}),
    ]
    if api:
        attacks += [
            ("bad JSON", post(b'{"prompt": [1, 2'), {400}),
            ("JSON nested 100000 deep", post(b"[" * 100000 + b"]" * 100000), {400}),
            ("a text/plain body", post(b"write me a poem", ctype="text/plain"), {400, 415}),
            ("a form body", post(b"prompt=1&max_tokens=2", ctype="application/x-www-form-urlencoded"), {400, 415}),
            ("invalid UTF-8 in the prompt", post(b'{"prompt": "\xff\xfe\xc3", "max_tokens": 1}'), {400, 200}),
            ("a NUL in the prompt", post(b'{"prompt": "a\\u0000b", "max_tokens": 1, "temperature": 0}'), {200, 400}),
            ("a 1e308 max_tokens", post(b'{"prompt": [1], "max_tokens": 1e308}'), {400}),
            ("a huge seed", post(b'{"prompt": [1], "max_tokens": 1, "seed": 99999999999999999999999}'), {400, 200}),
        ]
    else:
        attacks += [("POST /metrics", post(b"x").replace(b"/v1/completions", b"/metrics"), {404, 405, 400}),
                    ("GET /readyz/../metrics", b"GET /readyz/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", {404, 400})]
    return attacks


def attack_http(where, port, api):
    seen = []
    for name, payload, ok in http_attacks(port, api):
        t0 = time.monotonic()
        raw = H.raw_http(port, payload, timeout=10, half_close=True)
        st = H.status_of(raw)
        H.check(st in ok or (st is None and None in ok),
                f"{where}: {name}: answered {st} ({raw[:200]!r}), expected one of {sorted(ok, key=str)}")
        H.check(time.monotonic() - t0 < 10, f"{where}: {name}: no answer or close within 10 s")
        seen.append(f"{name}: {st or 'closed'}")
    H.log(f"{where}: {len(seen)} garbage HTTP requests answered as expected ({'; '.join(seen)})")


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=9)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = cli.generate(model, prompt_ids=prompt, max_tokens=5)

    with H.Cluster(args, tmp, model, tag="garbage") as c:
        c.up(attention=1, experts=2, kvstore=1)
        # Every ZeroMQ port of the cluster.
        steps = c.attention_step_endpoints()
        H.check(len(steps) == 1, f"the router's log names {len(steps)} attention step endpoints: {steps}")
        zmq_ports = [("router control", c.control), ("router placement", c.placement)]
        zmq_ports += [(f"{n} steps", e) for n, e in steps.items()]
        zmq_ports += [(p.name, p.endpoint) for p in c.experts + c.kvstores]

        # Idle connections left open on every HTTP port, for the whole test.
        idle = [socket.create_connection(("127.0.0.1", port)) for port in
                [c.api_port, c.admin_port] + [p.admin_port for p in c.procs if p is not c.router] for _ in range(3)]

        for where, ep in zmq_ports:
            attacks = zmtp_attacks(ep)
            for name, go in attacks:
                go()
            H.log(f"{where} ({ep}): {len(attacks)} ZMTP-level attacks")
        c.check_all_alive()

        attack_control(c)
        attack_placement(c)
        for name, ep in steps.items():
            attack_dataplane(f"{name} steps", ep, H.KIND_STEP_REQUEST)
        for p in c.experts:
            attack_dataplane(p.name, p.endpoint, H.KIND_DISPATCH_REQUEST)
        for p in c.kvstores:
            attack_dataplane(p.name, p.endpoint, H.KIND_KV_GET)
        c.check_all_alive()

        attack_http("router API", c.api_port, api=True)
        attack_http("router admin", c.admin_port, api=False)
        for p in c.attention + c.experts + c.kvstores:
            attack_http(f"{p.name} admin", p.admin_port, api=False)
        for s in idle:
            s.close()

        # Everyone is still up and ready, and the cluster still computes the right thing.
        time.sleep(0.3)
        c.check_all_alive()
        for p in c.procs:
            st, body = H.http(p.admin_port, "/readyz", timeout=5)
            H.check(st == 200, f"{p.name}: /readyz {st} after the garbage: {body}")
        st, ans = c.complete({"prompt": prompt, "max_tokens": 5, "temperature": 0, "return_token_ids": True,
                              "return_logits": True})
        H.check(st == 200, f"a good completion after the garbage: HTTP {st}: {str(ans)[:300]}")
        H.compare_with_reference("after the garbage", ans["choices"][0], ref)
        attack_control(c)  # the coordinator still answers too
        H.log("after the garbage: every process is up and ready; a completion matches the reference")


if __name__ == "__main__":
    H.main(test)
