#!/usr/bin/env python3
"""openai_client: `moemesh up` (the README's local cluster: router, attention worker, expert
hosts, KV store as separate processes) answers the official `openai` npm client: completion,
chat, streaming chat (same content as unstreamed, usage in the last chunk) and a bad parameter
raised as the client's BadRequestError. Driven by openai_client.mjs under node. Then, on a machine
without a GPU, `moemesh up --device cuda` stops at once with the process that failed and why.
"""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test(args, tmp):
    node_modules = H.node_packages(args, "openai")
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    model = cli.mkmodel("mixtral", os.path.join(tmp, "tiny-mixtral"), seed=2)
    up, port = H.moemesh_up(args, tmp, model)
    try:
        served = H.http(port, "/v1/models")[1]["data"][0]["id"]
        p = subprocess.run(["node", os.path.join(HERE, "openai_client.mjs"), f"http://127.0.0.1:{port}", served],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, NODE_PACKAGES=node_modules))
        print(p.stdout, p.stderr, flush=True)
        H.check(p.returncode == 0 and "openai client: OK" in p.stdout, "the openai client run failed (above)")
        rc, secs = up.terminate_and_wait(timeout=30)
        H.check(rc == 0, f"moemesh up exited {rc} on SIGTERM")
    except BaseException:
        print(up.log_text()[-4000:], flush=True)
        raise
    finally:
        up.kill()

    # `--device cuda` without a GPU: up stops at once, naming the process that failed and why.
    if shutil.which("nvidia-smi") is None:
        port, control, admin = H.free_port(), H.free_port_pair(), H.free_port()
        p = subprocess.run([args.cli, "up", "--model", model, "--attention", "1", "--experts", "1", "--device", "cuda",
                            "--gpus", "2", "--no-kvstore", "--port", str(port), "--control-port", str(control),
                            "--admin-port", str(admin), "--startup-timeout", "30", "--bin-dir",
                            os.path.dirname(args.router), "--log-dir", os.path.join(tmp, "logs-cuda")],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
        out = p.stdout + p.stderr
        print(out[-1500:], flush=True)
        H.check(p.returncode == 1, f"moemesh up --device cuda exited {p.returncode} without a GPU")
        H.check("exited during start-up" in out and "no CUDA device: " in out, "the failing process and why are named")


if __name__ == "__main__":
    H.main(test, lambda p: p.add_argument("--cache-dir", required=True))
