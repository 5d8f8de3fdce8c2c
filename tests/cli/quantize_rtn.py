#!/usr/bin/python3
"""`moemesh quantize --method rtn`, checked against tests/reference/gptq_reference.py.

For mkmodel's tiny Mixtral and DeepSeek-MoE models and a few flag sets, the output folder is read
with the reference's own safetensors reader and GPTQ unpacking (independent of the C++ loader):
  - every quantized Linear has qweight / qzeros / scales / g_idx with AutoGPTQ's dtypes and shapes,
    no .weight, and equals what the reference's pack_gptq makes of the same weights (same RTN
    convention), and dequantizes to within scale / 2 of the original per element;
  - every other tensor is the original converted to f16 (byte-equal to NumPy's rounding);
  - config.json / quantize_config.json carry the quantization_config, tokenizer files are copied;
  - `moemesh generate --json --logits` runs on it.
A small hf_reference checkpoint is quantized too and its logits compared with the reference's
float64 forward pass on the dequantized weights. Then the errors: one stderr line, exit 1.
Usage: quantize_rtn.py MOEMESH [--keep]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import gptq_reference as gq  # noqa: E402
import hf_reference as hf  # noqa: E402
from cli_checks import MOEMESH, check, run, summary, work_folder  # noqa: E402



def quantize(model, out, flags):
    rc, stdout, err = run(["quantize", "--model", model, "--out", out] + flags)
    if not check(rc == 0, "quantize %s: rc %d: %s" % (" ".join(flags), rc, err.strip())):
        return None
    return stdout


def as_f64(dt, a):
    return (hf.bf16_to_f32(a) if dt == "BF16" else a).astype(np.float64)


def f16_bits(dt, a):
    """What the original becomes in f16 (through f32, which holds F32/F16/BF16 exactly)."""
    return as_f64(dt, a).astype(np.float32).astype(np.float16).view(np.uint16)


def check_output(name, model, out, bits, group, sym, skip_attention, lm_head=False):
    """Returns the float64 weights the quantized checkpoint holds (name -> W)."""
    src, dst = gq.read_checkpoint(model), gq.read_checkpoint(out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model, "config.json")) as f:
        orig_cfg = json.load(f)
    want_q = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym,
              "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01, "lm_head": lm_head}
    check(cfg.get("quantization_config") == want_q, "%s: quantization_config %s" % (name, cfg.get("quantization_config")))
    check(cfg.get("torch_dtype") == "float16", "%s: torch_dtype %s" % (name, cfg.get("torch_dtype")))
    rest = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")}
    check(rest == {k: v for k, v in orig_cfg.items() if k != "torch_dtype"}, name + ": config.json changed")
    with open(os.path.join(out, "quantize_config.json")) as f:
        check(json.load(f) == want_q, name + ": quantize_config.json")
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(model, fname)):
            with open(os.path.join(model, fname), "rb") as a, open(os.path.join(out, fname), "rb") as b:
                check(a.read() == b.read(), "%s: %s not copied" % (name, fname))

    c = {"quantize_attention": not skip_attention, "lm_head": lm_head}
    p, W, quantized, expected = gq.pack_factor(bits), {}, 0, set()
    for wname, (dt, a) in src.items():
        module = gq.module_of(wname)
        if a.ndim != 2 or not gq.is_quantized(c, module):
            expected.add(wname)
            got = dst.get(wname)
            if check(got is not None and got[0] == "F16" and got[1].shape == a.shape, "%s: %s F16" % (name, wname)):
                check(np.array_equal(got[1].view(np.uint16), f16_bits(dt, a)), "%s: %s not the f16 original" % (name, wname))
                W[wname] = got[1].astype(np.float64)
            continue
        quantized += 1
        out_dim, inp = a.shape
        ng = gq.n_groups(inp, group)
        want = {"qweight": ("I32", (inp // p, out_dim)), "qzeros": ("I32", (ng, out_dim // p)),
                "scales": ("F16", (ng, out_dim)), "g_idx": ("I32", (inp,))}
        parts = {}
        for part, (pdt, shape) in want.items():
            expected.add(module + "." + part)
            got = dst.get(module + "." + part)
            if not check(got is not None and (got[0], got[1].shape) == (pdt, shape),
                         "%s: %s.%s %s" % (name, module, part, got and (got[0], got[1].shape))):
                return None
            parts[part] = got[1]
        orig = as_f64(dt, a)
        # The same convention as the reference writer: the same bits.
        ref = gq.pack_gptq(orig, bits, group, sym, False, None)
        for part in want:
            check(np.array_equal(parts[part].view(np.uint8), np.asarray(ref[part]).view(np.uint8)),
                  "%s: %s.%s differs from gptq_reference.pack_gptq" % (name, module, part))
        back = gq.unpack_gptq(parts, bits, group)
        half = parts["scales"].astype(np.float64)[parts["g_idx"]].T / 2
        err = np.abs(back - orig)
        check(np.all(err <= half * (1 + 1e-9)), "%s: %s: error %.3g above scale/2" % (name, module, float(np.max(err - half))))
        W[wname] = back
    check(set(dst) == expected, "%s: unexpected tensors %s, missing %s" %
          (name, sorted(set(dst) - expected)[:4], sorted(expected - set(dst))[:4]))
    print("ok %s: %d Linear quantized, %d tensors, %d -> %d bytes of weights" %
          (name, quantized, len(dst), sum(a.nbytes for _, a in src.values()), sum(a.nbytes for _, a in dst.values())))
    return W


def check_generate(name, out, vocab):
    rc, stdout, err = run(["generate", "--model", out, "--prompt-ids", "1,5,9,13", "--max-tokens", "8", "--json",
                           "--logits"])
    if not check(rc == 0, "%s: generate rc %d: %s" % (name, rc, err.strip())):
        return
    r = json.loads(stdout)
    logits = np.array(r["logits"], dtype=np.float64)
    check(1 <= len(r["output_ids"]) <= 8 and logits.shape == (len(r["output_ids"]) + 1, vocab),
          "%s: generate gave %d tokens, logits %s" % (name, len(r["output_ids"]), logits.shape))
    check(np.all(np.isfinite(logits)), name + ": non-finite logits")
    print("ok %s: generate -> %s" % (name, r["output_ids"]))
    rc, stdout, err = run(["inspect", "--model", out])
    check(rc == 0 and "quantization GPTQ " in stdout, "%s: inspect does not show the quantization: %s%s" %
          (name, stdout, err))


def errors(work, model, done):
    """(flags or a whole command, what the one stderr line names)."""
    odd = os.path.join(work, "odd")  # a Mixtral whose expert width 36 is not a multiple of 8
    c = dict(hf.BASE_MIX, inter=36, dtype="F32")
    hf.write_checkpoint(odd, hf.mixtral_config(c), hf.random_tensors(c, np.random.default_rng(1)), "F32", 1)
    nan = os.path.join(work, "nan")
    c = dict(hf.BASE_MIX, dtype="F32")
    t = hf.random_tensors(c, np.random.default_rng(2))
    t["model.layers.1.block_sparse_moe.experts.3.w2.weight"][5, 7] = np.nan
    hf.write_checkpoint(nan, hf.mixtral_config(c), t, "F32", 1)
    tied = os.path.join(work, "tied")
    c = dict(hf.BASE_MIX, dtype="F32", tied=True)
    hf.write_checkpoint(tied, hf.mixtral_config(c), hf.random_tensors(c, np.random.default_rng(3)), "F32", 1)
    new = os.path.join(work, "err-out")
    cases = [
        ([tied, new, "--lm-head"], "tie_word_embeddings"),
        ([model, new, "--bits", "3"], "--bits"),
        ([model, new, "--bits", "four"], "--bits"),
        ([model, new, "--method", "gptq"], "needs calibration data"),
        ([model, new, "--method", "awq"], "--method"),
        ([model, new, "--group-size", "0"], "--group-size"),
        ([model, new, "--group-size", "-2"], "--group-size"),
        ([model, new, "--dtype", "int8"], "--dtype"),
        ([model, new, "--sym", "--asym"], "--asym"),
        ([model, done], "not empty"),
        ([os.path.join(work, "no-such-model"), new], "no-such-model"),
        ([done, new], "already quantized"),
        ([odd, new], "not a multiple of 8"),
        ([nan, new], "non-finite"),
    ]
    for (m, o, *flags), want in cases:
        rc, _, err = run(["quantize", "--model", m, "--out", o] + flags)
        lines = err.strip().splitlines()
        check(rc == 1 and len(lines) == 1 and want in lines[0],
              "quantize %s: want exit 1 and one line with %r, got rc %d: %r" % (" ".join(flags) or m, want, rc, err))
        check(o == done or not os.path.exists(o), "quantize %s: left %s behind" % (" ".join(flags) or m, o))
    # An 8-bit pack factor of 4 takes the width 36.
    check(quantize(odd, os.path.join(work, "odd-int8"), ["--bits", "8"]) is not None, "odd width at 8 bits")
    print("ok errors: %d cases" % len(cases))


def main():
    with work_folder("moemesh-quantize-") as work:
        models = {}
        for arch, dtype in (("mixtral", "f32"), ("deepseek", "bf16")):
            models[arch] = os.path.join(work, arch)
            rc, _, err = run(["mkmodel", "--arch", arch, "--preset", "tiny", "--seed", "5", "--dtype", dtype, "--out",
                              models[arch]])
            if not check(rc == 0, "mkmodel %s: %s" % (arch, err.strip())):
                return 1
        # (model, flags, bits, group size, sym, skip attention)
        runs = [
            ("mixtral", ["--bits", "4", "--group-size", "32", "--sym"], 4, 32, True, False),
            ("mixtral", ["--bits", "8", "--group-size", "-1", "--asym"], 8, -1, False, False),
            ("deepseek", ["--bits", "4", "--group-size", "48", "--asym", "--skip-attention"], 4, 48, False, True),
            ("deepseek", [], 4, 128, True, False),  # the defaults; group 128 > hidden 64: one short group
        ]
        first = None
        for i, (arch, flags, bits, group, sym, skip) in enumerate(runs):
            name = "%s-%d" % (arch, i)
            out = os.path.join(work, name)
            stdout = quantize(models[arch], out, flags + ["--method", "rtn"] if i == 0 else flags)
            if stdout is None:
                continue
            check("model.layers.1:" in stdout and "ratio" in stdout, name + ": no progress / summary: " + stdout)
            print(stdout.strip().splitlines()[-1])
            first = first or out
            if check_output(name, models[arch], out, bits, group, sym, skip) is not None:
                with open(os.path.join(out, "config.json")) as f:
                    check_generate(name, out, json.load(f)["vocab_size"])

        # Logits against the reference's float64 forward pass on the weights the file holds,
        # lm_head quantized too (--lm-head).
        c, folder, _, prompt = hf.build_case("mixtral_f32_mha", work, 3)
        out = os.path.join(work, "ref-int4-g32-asym")  # in 48 (w2): a group of 32 and one of 16
        if quantize(folder, out, ["--bits", "4", "--group-size", "32", "--asym", "--lm-head"]) is not None:
            W = check_output("ref-int4-g32-asym", folder, out, 4, 32, False, False, lm_head=True)
            if W is not None:
                check(hf.compare_case(MOEMESH, "ref-int4-g32-asym", dict(c, dtype="F16"), out, W, prompt),
                      "reference logits")

        errors(work, models["mixtral"], first)
    return summary("quantize_rtn")


if __name__ == "__main__":
    sys.exit(main())
