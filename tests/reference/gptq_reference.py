#!/usr/bin/python3
"""Independent NumPy reference for GPTQ checkpoints (issue #13), built on hf_reference.py.

The format is AutoGPTQ / GPTQModel / Optimum's checkpoint_format "gptq" (v1); docs/quantization.md
describes it. For each case this script
  (a) writes a random Mixtral or DeepSeek-MoE checkpoint whose experts (and attention, unless
      quantize_attention is false) are RTN-quantized to INT4 or INT8 and stored as qweight /
      qzeros / scales / g_idx, the rest in the case's dtype (F16, as GPTQ checkpoints have it),
  (b) runs `moemesh generate --json --logits` exactly as hf_reference.check_case does, and
  (c) compares every logits row and the greedy path with hf_reference.forward on the weights
      dequantized by the format's definition (float64; f32 holds them exactly).
`gptq_errors` writes broken checkpoints that moemesh must refuse with exit 1 and one stderr line.

Usage: gptq_reference.py --cli PATH [--case NAME ...] [--workdir DIR] [--keep]
       gptq_reference.py --write-only --workdir DIR --case NAME   (just write the checkpoint)
       gptq_reference.py --self-test                              (NumPy pack/unpack checks only)
Exits non-zero when a case fails. Run with /usr/bin/python3 (it has numpy).
"""
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference as hf  # noqa: E402

# The smallest normal float16: a group of zeros still gets a scale that divides.
MIN_SCALE = 2.0 ** -14

# ----------------------------------------------------------------------------- the format


def pack_factor(bits):
    return 32 // bits


def n_groups(inp, group_size):
    return 1 if group_size == -1 else -(-inp // group_size)


def make_g_idx(inp, group_size, desc_act, rng):
    """With desc_act GPTQ quantizes the columns in a permuted order (by the Hessian's diagonal);
    any permutation exercises the same lookup, so a random one stands in for it."""
    G = inp if group_size == -1 else group_size
    order = rng.permutation(inp) if desc_act else np.arange(inp)
    g_idx = np.empty(inp, dtype=np.int32)
    g_idx[order] = np.arange(inp) // G
    return g_idx


def f16_up(x):
    """x rounded up to float16: the stored scale is what dequantization uses, and rounding it up
    keeps the group's range within 2^b - 1 steps, so no q is ever clipped."""
    x = np.maximum(np.asarray(x, dtype=np.float64), MIN_SCALE)
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def rtn_params(w, bits, sym):
    """Scale (float16) and zero per output channel of one group; w [channels, out]."""
    maxq = (1 << bits) - 1
    if sym:
        half = 1 << (bits - 1)
        return f16_up(np.abs(w).max(axis=0) / (half - 1)), np.full(w.shape[1], half, dtype=np.int64)
    lo, hi = np.minimum(w.min(axis=0), 0.0), np.maximum(w.max(axis=0), 0.0)  # GPTQ's range holds 0
    scale = f16_up((hi - lo) / maxq)
    zero = np.round(-lo / scale.astype(np.float64)).astype(np.int64)
    # v1 stores zero - 1, so a zero of 0 is stored as 2^b - 1, which readers disagree on (zero 2^b
    # by the definition, 0 where they mask after the +1): keep zero >= 1, and stretch the scale so
    # hi still fits above it.
    low = zero < 1
    scale[low] = f16_up(hi[low] / (maxq - 1))
    zero[low] = 1
    return scale, zero


def pack_words(v, bits):
    """v [n, m] of b-bit values -> int32 [n / p, m]: row i*p + k in bits [b*k, b*k + b)."""
    p = pack_factor(bits)
    v = v.astype(np.uint64).reshape(v.shape[0] // p, p, v.shape[1])
    words = sum(v[:, k, :] * np.uint64(1 << (bits * k)) for k in range(p))
    return words.astype(np.uint32).view(np.int32)


def pack_gptq(W, bits, group_size, sym, desc_act, rng):
    """RTN-quantizes W [out, in]; returns qweight, qzeros, scales, g_idx and "W", the float64
    weights as dequantization gives them back."""
    out, inp = W.shape
    p, maxq = pack_factor(bits), (1 << bits) - 1
    if bits not in (4, 8) or inp % p or out % p:
        raise ValueError("bits %d with a [%d, %d] weight" % (bits, out, inp))
    g_idx = make_g_idx(inp, group_size, desc_act, rng)
    ng = n_groups(inp, group_size)
    wt = np.asarray(W, dtype=np.float64).T  # [in, out]: the packed layout
    scales, zeros = np.empty((ng, out), np.float16), np.empty((ng, out), np.int64)
    for g in range(ng):
        scales[g], zeros[g] = rtn_params(wt[g_idx == g], bits, sym)
    s, z = scales.astype(np.float64)[g_idx], zeros[g_idx]
    q = np.clip(np.round(wt / s) + z, 0, maxq).astype(np.int64)
    return {
        "qweight": pack_words(q, bits),
        "qzeros": np.ascontiguousarray(pack_words(((zeros - 1) & maxq).T, bits).T),
        "scales": scales,
        "g_idx": g_idx,
        "W": (s * (q - z)).T,
    }


def unpack_gptq(t, bits, group_size):
    """float64 W [out, in] from qweight / qzeros / scales / g_idx, by the format's definition."""
    mask = np.uint32((1 << bits) - 1)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    qw, qz = t["qweight"].view(np.uint32), t["qzeros"].view(np.uint32)
    q = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qw.shape[1])  # [in, out]
    zero = ((qz[:, :, None] >> shifts[None, None, :]) & mask).reshape(qz.shape[0], -1) + 1
    g_idx, scales = t["g_idx"], t["scales"]
    inp, out = q.shape
    if scales.shape != (n_groups(inp, group_size), out) or zero.shape != scales.shape:
        raise ValueError("scales %s / qzeros %s for [%d, %d]" % (scales.shape, qz.shape, out, inp))
    if g_idx.shape != (inp,) or g_idx.min() < 0 or g_idx.max() >= scales.shape[0]:
        raise ValueError("g_idx out of range")
    s = scales.astype(np.float64)[g_idx]
    return (s * (q.astype(np.int64) - zero[g_idx].astype(np.int64))).T


# ----------------------------------------------------------------------------- checkpoints

QUANT_KEYS = ("bits", "group_size", "desc_act", "sym")

CASES = {
    # INT4, groups of 16, symmetric (qzeros all 0x77777777)
    "gptq_mixtral_int4_g16_sym": dict(hf.BASE_MIX, dtype="F16", shards=1, prompt=9, bits=4, group_size=16,
                                      sym=True, desc_act=False),
    # INT8, one group over all inputs, asymmetric, GQA 2, sharded
    "gptq_mixtral_int8_gall_asym": dict(hf.BASE_MIX, dtype="F16", kv_heads=2, shards=2, prompt=8, bits=8,
                                        group_size=-1, sym=False, desc_act=False),
    # INT4 with desc_act: g_idx from a random column order, asymmetric; lm_head quantized too
    "gptq_mixtral_int4_descact": dict(hf.BASE_MIX, dtype="F16", shards=1, prompt=10, bits=4, group_size=16,
                                      sym=False, desc_act=True, lm_head=True),
    # dense first layer + 2 shared experts quantized, attention left in F16, asymmetric
    "gptq_deepseek_int4_g16_shared": dict(hf.BASE_DS, dtype="F16", shards=1, prompt=7, bits=4, group_size=16,
                                          sym=False, desc_act=False, quantize_attention=False),
}


def quant_config(c):
    q = {"quant_method": "gptq"}
    q.update({k: c[k] for k in QUANT_KEYS})
    q.update(checkpoint_format="gptq", true_sequential=True, damp_percent=0.01, lm_head=c.get("lm_head", False))
    return q


def module_of(name):
    return name[:-len(".weight")] if name.endswith(".weight") else name


def is_quantized(c, module):
    """module: a Linear's name without .weight. Router gates, embeddings and norms stay; lm_head
    is quantized when the case (GPTQModel's quantization_config "lm_head") says so."""
    if module == "lm_head":
        return c.get("lm_head", False)
    if ".self_attn." in module:
        return c.get("quantize_attention", True)
    if ".block_sparse_moe.experts." in module:
        return True
    return ".mlp." in module and not module.endswith(".mlp.gate")


def quantize_tensors(c, tensors, rng):
    """Returns (name -> (st dtype, raw array), name -> float64 W the reference computes with)."""
    entries, W = {}, {}
    for name, a in tensors.items():
        module = module_of(name)
        if name.endswith(".weight") and is_quantized(c, module):
            t = pack_gptq(a, c["bits"], c["group_size"], c["sym"], c["desc_act"], rng)
            W[name] = t.pop("W")
            for part, raw in t.items():
                entries[module + "." + part] = ("F16" if part == "scales" else "I32", raw)
        else:
            dt, raw, W[name] = hf.store(a, c["dtype"])
            entries[name] = (dt, raw)
    return entries, W


def write_gptq(folder, config, entries, shards):
    hf.write_entries(folder, config, [(n, dt, raw) for n, (dt, raw) in entries.items()], shards)
    with open(os.path.join(folder, "quantize_config.json"), "w") as f:
        json.dump(config["quantization_config"], f, indent=2)  # older AutoGPTQ reads this one


def case_tensors(name, seed):
    c = dict(CASES[name])
    cfg = hf.mixtral_config(c) if c["arch"] == "mixtral" else hf.deepseek_config(c)
    cfg["quantization_config"] = quant_config(c)
    c["config"] = cfg
    rng = np.random.default_rng(seed)
    tensors = hf.random_tensors(c, rng)
    prompt = [int(v) for v in rng.integers(3, c["vocab"], size=c["prompt"])]
    entries, W = quantize_tensors(c, tensors, np.random.default_rng([seed, 1]))
    return c, entries, W, prompt


def build_case(name, workdir, seed):
    c, entries, W, prompt = case_tensors(name, seed)
    folder = os.path.join(workdir, name)
    shutil.rmtree(folder, ignore_errors=True)
    write_gptq(folder, c["config"], entries, c["shards"])
    return c, folder, W, prompt


def check_case(cli, name, workdir, seed):
    c, folder, W, prompt = build_case(name, workdir, seed)
    return hf.compare_case(cli, name, c, folder, W, prompt)


# ----------------------------------------------------------------------------- error cases

MOD = "model.layers.1.block_sparse_moe.experts.2.w2"  # in = inter 48: three groups of 16
ATTN = "model.layers.0.self_attn.k_proj"
SYM, DESC = "gptq_mixtral_int4_g16_sym", "gptq_mixtral_int4_descact"


def grow(entries, name, axis):
    dt, raw = entries[name]
    shape = list(raw.shape)
    shape[axis] = 1
    entries[name] = (dt, np.concatenate([raw, np.zeros(shape, raw.dtype)], axis=axis))


def set_bits(config, bits):
    config["quantization_config"]["bits"] = bits


def g_idx_past_end(entries):
    dt, raw = entries[MOD + ".g_idx"]
    raw = raw.copy()
    raw[5] = n_groups(raw.shape[0], CASES[DESC]["group_size"])
    entries[MOD + ".g_idx"] = (dt, raw)


# (label, the case it breaks, how, what the one error line must contain)
ERRORS = [
    ("qweight_rows", SYM, lambda cfg, t: grow(t, ATTN + ".qweight", 0), ATTN + ".qweight"),
    ("qzeros_width", SYM, lambda cfg, t: grow(t, MOD + ".qzeros", 1), MOD + ".qzeros"),
    ("scales_groups", SYM, lambda cfg, t: grow(t, MOD + ".scales", 0), MOD + ".scales"),
    ("g_idx_missing_desc_act", DESC, lambda cfg, t: t.pop(MOD + ".g_idx"), MOD + ".g_idx"),
    ("bits_3", SYM, lambda cfg, t: set_bits(cfg, 3), "bits"),
    ("g_idx_past_groups", DESC, lambda cfg, t: g_idx_past_end(t), MOD + ".g_idx"),
    ("qzeros_missing", SYM, lambda cfg, t: t.pop(MOD + ".qzeros"), MOD + ".qzeros"),
    ("lm_head_flag_but_float", SYM, lambda cfg, t: cfg["quantization_config"].update(lm_head=True), "lm_head.weight"),
]


def write_errors(workdir, seed):
    """Returns [(label, folder, expected substring)]."""
    written = []
    for label, base, breaks, want in ERRORS:
        c, entries, _, _ = case_tensors(base, seed)
        config = json.loads(json.dumps(c["config"]))
        breaks(config, entries)
        folder = os.path.join(workdir, "gptq_errors", label)
        shutil.rmtree(folder, ignore_errors=True)
        write_gptq(folder, config, entries, 1)
        written.append((label, folder, want))
    return written


def check_errors(cli, workdir, seed):
    ok = True
    for label, folder, want in write_errors(workdir, seed):
        rc, _, err = hf.run_cli(cli, ["generate", "--model", folder, "--prompt-ids", "1,2", "--max-tokens", "1"])
        lines = err.strip().splitlines()
        if rc != 1 or len(lines) != 1 or want not in lines[0]:
            print("gptq_errors: %s: want exit 1 and one line naming %r; got rc %d, stderr %r" % (label, want, rc, err))
            ok = False
    print("gptq_errors: %d broken checkpoints: %s" % (len(ERRORS), "ok" if ok else "FAILED"))
    return ok


# ----------------------------------------------------------------------------- self-test

NP_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I32": "<i4"}


def read_safetensors(path):
    """name -> (st dtype, array), checking that the data offsets tile the data exactly."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        a, b = e["data_offsets"]
        assert a == end, "%s: offset %d, expected %d" % (name, a, end)
        arr = np.frombuffer(data[a:b], dtype=NP_DTYPE[e["dtype"]])
        out[name], end = (e["dtype"], arr.reshape(e["shape"])), b
    assert end == len(data), "%s: %d data bytes, header covers %d" % (path, len(data), end)
    return out


def read_checkpoint(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    t = {}
    for fname in files:
        t.update(read_safetensors(os.path.join(folder, fname)))
    return t


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def self_test_words():
    """The bit layout on hand-made values, independent of pack_gptq."""
    expect(pack_words(np.arange(8).reshape(8, 1), 4)[0, 0] == 0x76543210, "4-bit order")
    expect(pack_words(np.array([[1], [2], [3], [4]]), 8)[0, 0] == 0x04030201, "8-bit order")
    for bits, word in ((4, 0x77777777), (8, 0x7F7F7F7F)):
        t = pack_gptq(np.random.default_rng(1).standard_normal((16, 32)), bits, 16, True, False, None)
        expect(np.all(t["qzeros"] == word), "%d-bit symmetric qzeros %#x" % (bits, word))
    # The v1 quirk, by the definition (zero = stored + 1, unmasked): all ones read back as 2^b.
    t = {"qweight": np.zeros((1, 8), np.int32), "qzeros": np.full((1, 1), -1, np.int32),
         "scales": np.ones((1, 8), np.float16), "g_idx": np.zeros(8, np.int32)}
    expect(np.all(unpack_gptq(t, 4, -1) == -16), "v1 zero quirk")


def self_test_roundtrips():
    rng = np.random.default_rng(7)
    count = 0
    for bits in (4, 8):
        for G in (8, 16, -1):
            for inp in (64, 40):  # 40: a last group shorter than G
                for sym in (True, False):
                    for desc_act in (False, True):
                        W = rng.standard_normal((48, inp)) * rng.uniform(0.01, 3.0)
                        # outputs whose groups hold no negative (asym zero 0: the clamp) or no positive
                        W[:8], W[8:16] = np.abs(W[:8]), -np.abs(W[8:16])
                        t = pack_gptq(W, bits, G, sym, desc_act, rng)
                        what = "bits %d G %d in %d sym %s desc_act %s" % (bits, G, inp, sym, desc_act)
                        back = unpack_gptq(t, bits, G)
                        expect(np.array_equal(back, t["W"]), what + ": unpack(pack(W)) != dequantized W")
                        half = t["scales"].astype(np.float64)[t["g_idx"]].T / 2
                        expect(np.all(np.abs(back - W) <= half * (1 + 1e-9)), what + ": error above scale/2")
                        counts = np.bincount(t["g_idx"], minlength=n_groups(inp, G))
                        size = inp if G == -1 else G
                        expect(np.all(counts[:-1] == size) and 0 < counts[-1] <= size, what + ": group sizes")
                        if not desc_act:
                            expect(np.array_equal(t["g_idx"], np.arange(inp) // size), what + ": g_idx")
                        count += 1
    return count


def self_test_checkpoints(workdir):
    """Every case written and read back: dtypes, shapes, no .weight where quantized, and the file
    dequantizes to the W the reference computes with."""
    for name in CASES:
        c, folder, W, _ = build_case(name, workdir, 0)
        t = read_checkpoint(folder)
        with open(os.path.join(folder, "quantize_config.json")) as f:
            expect(json.load(f) == c["config"]["quantization_config"], name + ": quantize_config.json")
        p, quantized = pack_factor(c["bits"]), 0
        for wname, ref in W.items():
            module = module_of(wname)
            if not is_quantized(c, module):
                expect(t[wname][0] == c["dtype"] and t[wname][1].shape == ref.shape, wname)
                continue
            out, inp = ref.shape
            ng = n_groups(inp, c["group_size"])
            want = {"qweight": ("I32", (inp // p, out)), "qzeros": ("I32", (ng, out // p)),
                    "scales": ("F16", (ng, out)), "g_idx": ("I32", (inp,))}
            for part, (dt, shape) in want.items():
                got = t[module + "." + part]
                expect((got[0], got[1].shape) == (dt, shape), "%s.%s: %s %s" % (module, part, got[0], got[1].shape))
            expect(wname not in t, wname + " next to its qweight")
            parts = {k: t[module + "." + k][1] for k in want}
            expect(np.array_equal(unpack_gptq(parts, c["bits"], c["group_size"]), ref), module + ": dequantized")
            quantized += 1
        expect(len(t) == len(W) + 3 * quantized, name + ": unexpected tensors")
        attention = sum(is_quantized(c, module_of(w)) for w in W if ".self_attn." in w)
        print("self-test: %s: %d quantized modules (%d attention), %d tensors read back" %
              (name, quantized, attention, len(t)))
    for label, folder, _ in write_errors(workdir, 0):
        read_checkpoint(folder)
    print("self-test: %d gptq_errors checkpoints written and read back" % len(ERRORS))


def self_test():
    self_test_words()
    n = self_test_roundtrips()
    print("self-test: bit layout, v1 zero quirk, %d pack/unpack round trips: ok" % n)
    workdir = tempfile.mkdtemp(prefix="moemesh-gptq-")
    try:
        self_test_checkpoints(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("self-test: ok")


# ----------------------------------------------------------------------------- main


def main():
    hf.sibling_main(CASES, "gptq_errors", build_case, write_errors, check_case, check_errors, self_test,
                    "only the NumPy pack/unpack checks (no --cli)")


if __name__ == "__main__":
    main()
