#!/usr/bin/env python3
"""structured_outputs: `moemesh up` answers structured-output and tool-call requests from the
official `openai` npm client; structured_outputs.mjs checks every output with ajv (200 requests
over 10 JSON schemas, zod parse, forced and streamed tool calls, token ids on stream chunks,
logit_bias, refusals naming the unsupported field or keyword).
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test(args, tmp):
    node_modules = H.node_packages(args, "openai", "ajv", "ajv-formats", "zod")
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    # mixtral: Llama-2's SentencePiece tokenizer (byte fallback), Hermes-style calls in a preamble;
    # deepseek: DeepSeek-V3's byte-level BPE (128K tokens) and its own call format and template.
    model = cli.mkmodel(args.arch, os.path.join(tmp, f"tiny-{args.arch}"), seed=3)
    eos = json.load(open(os.path.join(model, "config.json")))["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    up, port = H.moemesh_up(args, tmp, model)
    try:
        served = H.http(port, "/v1/models")[1]["data"][0]["id"]
        p = subprocess.run(["node", os.path.join(HERE, "structured_outputs.mjs"), f"http://127.0.0.1:{port}", served,
                            str(args.requests), str(eos)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, NODE_PACKAGES=node_modules))
        print(p.stdout, p.stderr, flush=True)
        H.check(p.returncode == 0 and "structured outputs: OK" in p.stdout, "the structured outputs run failed (above)")
    except BaseException:
        print(up.log_text()[-4000:], flush=True)
        raise
    finally:
        up.kill()


if __name__ == "__main__":
    def extra(p):
        p.add_argument("--cache-dir", required=True)
        p.add_argument("--requests", type=int, default=200)
        p.add_argument("--arch", default="mixtral")
    H.main(test, extra)
