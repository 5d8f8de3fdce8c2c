#!/usr/bin/python3
"""`moemesh quantize --method gptq`, checked with tests/reference's independent readers.

- mkmodel's tiny Mixtral, calibrated with --calibration-text and with a .jsonl file (text, prompt
  and chat messages lines): the GPTQ tensors have AutoGPTQ's dtypes and shapes, the config says
  desc_act and damp_percent, every layer reports progress, and `moemesh generate` / `inspect` run on it.
- hf_reference checkpoints (Mixtral; DeepSeek with a dense layer and shared experts) calibrated
  with pre-tokenized input_ids lines: the weights read back by gptq_reference.unpack_gptq are near
  the originals, and `moemesh generate`'s logits match hf_reference's float64 forward pass on them
  (rel 1e-4, greedy path identical): the loader reads exactly what the quantizer wrote.
- An expert with too few calibration rows is rounded to nearest, with a warning naming the layer
  and the expert: its tensors equal gptq_reference.pack_gptq's RTN bits.
- Bad flags and bad calibration data: exit 1, one stderr line, nothing left behind.
Usage: quantize_gptq.py MOEMESH [--keep]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import gptq_reference as gq  # noqa: E402
import hf_reference as hf  # noqa: E402
from cli_checks import MOEMESH, check, run, summary, work_folder  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones "
        "before it; quantization stores its weights in fewer bits, and calibration shows which of those "
        "weights matter for the activations the model really sees. ") * 6


def quantize(model, out, flags):
    rc, stdout, err = run(["quantize", "--model", model, "--out", out, "--method", "gptq"] + flags)
    if not check(rc == 0, "quantize %s: rc %d: %s" % (" ".join(flags), rc, err.strip())):
        return None, err
    return stdout, err


def read_back(name, model, out, bits, group, sym, desc_act, damp, lm_head=False):
    """name -> float64 W the quantized checkpoint holds (dequantized by the format's definition)."""
    src, dst = gq.read_checkpoint(model), gq.read_checkpoint(out)
    with open(os.path.join(out, "config.json")) as f:
        q = json.load(f).get("quantization_config")
    want = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": damp, "lm_head": lm_head}
    check(q == want, "%s: quantization_config %s" % (name, q))
    p, W, reordered, worst = gq.pack_factor(bits), {}, 0, 0.0
    for wname, (dt, a) in src.items():
        module = gq.module_of(wname)
        if a.ndim != 2 or not gq.is_quantized({"lm_head": lm_head}, module):
            W[wname] = dst[wname][1].astype(np.float64)
            continue
        out_dim, inp = a.shape
        ng = gq.n_groups(inp, group)
        shapes = {"qweight": ("I32", (inp // p, out_dim)), "qzeros": ("I32", (ng, out_dim // p)),
                  "scales": ("F16", (ng, out_dim)), "g_idx": ("I32", (inp,))}
        parts = {}
        for part, want_shape in shapes.items():
            got = dst.get(module + "." + part)
            if not check(got is not None and (got[0], got[1].shape) == want_shape,
                         "%s: %s.%s %s" % (name, module, part, got and (got[0], got[1].shape))):
                return None
            parts[part] = got[1]
        check(wname not in dst, "%s: %s next to its qweight" % (name, wname))
        W[wname] = gq.unpack_gptq(parts, bits, group)
        orig = (hf.bf16_to_f32(a) if dt == "BF16" else a).astype(np.float64)
        worst = max(worst, np.linalg.norm(W[wname] - orig) / np.linalg.norm(orig))
        reordered += not np.array_equal(parts["g_idx"], np.arange(inp) // (inp if group == -1 else group))
    # GPTQ moves weights to lower the output error, but stays near them (4-bit RTN: ~0.1).
    check(worst < (0.35 if bits == 4 else 0.03), "%s: a quantized weight is %.3g away (relative)" % (name, worst))
    check(reordered > 0 if desc_act else reordered == 0, "%s: %d modules with desc_act groups" % (name, reordered))
    print("ok %s: %d tensors, worst relative weight change %.3f, %d modules in act order" %
          (name, len(dst), worst, reordered))
    return W


def tiny_model(work):
    model = os.path.join(work, "tiny")
    rc, _, err = run(["mkmodel", "--arch", "mixtral", "--preset", "tiny", "--seed", "3", "--dtype", "bf16", "--out",
                      model])
    check(rc == 0, "mkmodel: " + err.strip())
    return model


def check_tiny(work, model):
    out = os.path.join(work, "tiny-gptq")
    stdout, err = quantize(model, out, ["--calibration-text", TEXT, "--group-size", "32", "--min-expert-rows", "16",
                                        "--desc-act"])
    if stdout is None:
        return
    check("gptq layer 1/2" in stdout and "gptq layer 2/2" in stdout and "calibration:" in stdout,
          "tiny: progress lines: " + stdout)
    read_back("tiny-gptq", model, out, 4, 32, True, True, 0.01)
    rc, stdout, err = run(["generate", "--model", out, "--prompt", "The quick brown fox", "--max-tokens", "4",
                           "--json"])
    check(rc == 0 and len(json.loads(stdout)["output_ids"]) >= 1, "tiny: generate: %s" % err.strip())
    rc, stdout, err = run(["inspect", "--model", out])
    check(rc == 0 and "quantization GPTQ 4-bit, group size 32, desc_act" in stdout, "tiny: inspect: " + stdout + err)

    calib = os.path.join(work, "calib.jsonl")
    with open(calib, "w") as f:
        f.write(json.dumps({"text": TEXT}) + "\n\n")
        f.write(json.dumps({"prompt": "Write a poem about the sea."}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "What is GPTQ?"},
                                         {"role": "assistant", "content": "A way to quantize weights."}]}) + "\n")
    out8 = os.path.join(work, "tiny-gptq8")
    stdout, _ = quantize(model, out8, ["--calibration", calib, "--bits", "8", "--group-size", "-1", "--asym",
                                       "--damp", "0.05", "--seq-len", "64", "--min-expert-rows", "8"])
    if stdout is not None:
        check("from 3 samples" in stdout, "tiny jsonl: " + stdout)
        read_back("tiny-gptq8", model, out8, 8, -1, False, False, 0.05)


def ids_file(work, name, vocab, n, seed):
    rng = np.random.default_rng(seed)
    path = os.path.join(work, name)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"input_ids": [int(v) for v in rng.integers(3, vocab, size=40)]}) + "\n")
    return path


def check_reference(work):
    """hf_reference models: what the quantizer wrote, read back independently, gives moemesh's logits."""
    for case, flags, bits, group, sym, desc, lm_head in (
            ("mixtral_f32_mha", ["--group-size", "16", "--asym", "--desc-act", "--lm-head"], 4, 16, False, True, True),
            ("deepseek_f32_shared", ["--bits", "8", "--group-size", "16"], 8, 16, True, False, False)):
        c, folder, _, prompt = hf.build_case(case, work, 4)
        calib = ids_file(work, case + ".jsonl", c["vocab"], 8, 5)
        out = os.path.join(work, case + "-gptq")
        stdout, err = quantize(folder, out, ["--calibration", calib, "--min-expert-rows", "4"] + flags)
        if stdout is None:
            continue
        check("warning" not in err, "%s: unexpected warnings: %s" % (case, err))
        check(("gptq lm_head:" in stdout) == lm_head, "%s: lm_head progress line: %s" % (case, stdout))
        W = read_back(case, folder, out, bits, group, sym, desc, 0.01, lm_head)
        if W is not None:
            check(hf.compare_case(MOEMESH, case + "-gptq", dict(c, dtype="F16"), out, W, prompt), case + " logits")

    # Experts short of rows fall back to RTN: the same bits as the reference's RTN writer.
    c, folder, _, _ = hf.build_case("mixtral_f32_mha", work, 4)
    out = os.path.join(work, "starved")
    stdout, err = quantize(folder, out, ["--calibration", ids_file(work, "few.jsonl", c["vocab"], 2, 6),
                                         "--group-size", "16", "--min-expert-rows", "1000"])
    if stdout is None:
        return
    for layer in range(c["layers"]):
        for e in range(c["experts"]):
            check("model.layers.%d expert %d: " % (layer, e) in err, "starved: no warning for layer %d expert %d: %s" %
                  (layer, e, err))
    check("(4 GPTQ, 12 RTN)" in stdout, "starved: progress: " + stdout)
    src, dst = gq.read_checkpoint(folder), gq.read_checkpoint(out)
    module = "model.layers.1.block_sparse_moe.experts.2.w2"
    ref = gq.pack_gptq(src[module + ".weight"][1].astype(np.float64), 4, 16, True, False, None)
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        check(np.array_equal(dst[module + "." + part][1].view(np.uint8), np.asarray(ref[part]).view(np.uint8)),
              "starved: %s.%s is not RTN's" % (module, part))
    print("ok starved experts: warned and rounded to nearest")


def errors(work, model):
    c, hf_model, _, _ = hf.build_case("mixtral_f32_mha", work, 4)
    bad = os.path.join(work, "bad.jsonl")
    with open(bad, "w") as f:
        f.write(json.dumps({"text": "fine"}) + "\n{not json\n")
    odd = os.path.join(work, "odd.jsonl")
    with open(odd, "w") as f:
        f.write(json.dumps({"content": "no known key"}) + "\n")
    big = os.path.join(work, "big.jsonl")
    with open(big, "w") as f:
        f.write(json.dumps({"input_ids": [1, 2, 100000]}) + "\n")
    new = os.path.join(work, "err-out")
    cases = [
        ([model, "--method", "gptq"], "needs calibration data"),
        ([model, "--method", "gptq", "--calibration", bad, "--calibration-text", "x"], "exclude each other"),
        ([model, "--desc-act"], "--desc-act"),
        ([model, "--calibration-text", "x"], "only --method gptq"),
        ([model, "--method", "gptq", "--calibration-text", "x", "--damp", "-1"], "--damp"),
        ([model, "--method", "gptq", "--calibration-text", "x", "--damp", "lots"], "--damp"),
        ([model, "--method", "gptq", "--calibration-text", "x", "--seq-len", "0"], "--seq-len"),
        ([model, "--method", "gptq", "--calibration", bad], "bad.jsonl:2"),
        ([model, "--method", "gptq", "--calibration", odd], "odd.jsonl:1: expected"),
        ([model, "--method", "gptq", "--calibration", os.path.join(work, "missing.jsonl")], "cannot open"),
        ([hf_model, "--method", "gptq", "--calibration-text", "x"], "tokenizer.json"),
        ([hf_model, "--method", "gptq", "--calibration", big], "outside the vocabulary"),
    ]
    for (m, *flags), want in cases:
        rc, _, err = run(["quantize", "--model", m, "--out", new] + flags)
        lines = err.strip().splitlines()
        check(rc == 1 and len(lines) == 1 and want in lines[0],
              "quantize %s: want exit 1 and one line with %r, got rc %d: %r" % (" ".join(flags), want, rc, err))
        check(not os.path.exists(new), "quantize %s: left %s behind" % (" ".join(flags), new))
    left = [f for f in os.listdir(work) if ".tmp-" in f]
    check(not left, "temporary folders left behind: %s" % left)
    rc, _, err = run(["quantize-eval", "--reference", model, "--quantized", model])
    check(rc == 1 and "--text" in err, "quantize-eval without text: rc %d %r" % (rc, err))
    print("ok errors: %d cases" % len(cases))


def main():
    with work_folder("moemesh-quantize-gptq-") as work:
        model = tiny_model(work)
        check_tiny(work, model)
        check_reference(work)
        errors(work, model)
    return summary("quantize_gptq")


if __name__ == "__main__":
    sys.exit(main())
