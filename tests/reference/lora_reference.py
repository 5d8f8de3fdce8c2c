#!/usr/bin/python3
"""Independent NumPy reference for LoRA adapters (issue #16), built on hf_reference.py.

The adapter format is PEFT's (peft_type "LORA"): a folder with adapter_config.json and
adapter_model.safetensors, tensors named as PEFT saves them,
  base_model.model.<base module>.lora_A.weight  [r, in]
  base_model.model.<base module>.lora_B.weight  [out, r]
e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, and for each module the
weight  W' = W + s * B @ A  with  s = lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora).
For each case this script
  (a) writes one of hf_reference's random checkpoints (hf.build_case, the same seed and folder),
  (b) writes a random adapter for it into <workdir>/<case>-adapter (B nonzero, unlike PEFT's
      init, and sized so that s * B @ A is ~20% of W: the adapter must change the logits; the
      case fails if the merged reference moves less than MIN_EFFECT from the base one),
  (c) runs `moemesh generate --model BASE --lora ADAPTER --json --logits` exactly as
      hf_reference.compare_case does, and compares every logits row and the greedy path with
      hf_reference.forward on the merged weights (float64; for a BF16 or F16 base the merged
      weight rounded to the base dtype, as a merge at load time that keeps the dtype stores it).
`lora_errors` writes broken adapters that moemesh must refuse with exit 1 and one stderr line.

Usage: lora_reference.py --cli PATH [--case NAME ...] [--workdir DIR] [--keep]
       lora_reference.py --write-only --workdir DIR --case NAME   (just write checkpoint + adapter)
       lora_reference.py --self-test                              (NumPy checks only, no --cli)
Exits non-zero when a case fails. Run with /usr/bin/python3 (it has numpy).
"""
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference as hf  # noqa: E402
import gptq_reference as gq  # noqa: E402  (read_safetensors, expect)

PEFT_PREFIX = "base_model.model."
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MIX_FFN = ("w1", "w2", "w3")
DS_FFN = ("gate_proj", "up_proj", "down_proj")  # PEFT's suffix match: routed, shared and dense MLPs
# s * B @ A has entries of about DELTA_FRAC / sqrt(in); W's are scale / sqrt(in) with scale >= 1.
DELTA_FRAC = 0.2
# The merged reference's logits must move at least this much (rel, per row) from the base's.
MIN_EFFECT = 1e-2

# base: the hf_reference case whose checkpoint the adapter is for.
CASES = {
    # q/k/v/o on GQA 2 (k/v narrower than q), sliding window, sharded base, gating temperature 0.5
    "lora_mixtral_attn": dict(base="mixtral_f32_gqa2_window", targets=ATTN, rank=8, alpha=16),
    # every expert's w1/w2/w3, rank 4
    "lora_mixtral_experts": dict(base="mixtral_f32_mha", targets=MIX_FFN, rank=4, alpha=8),
    # attention, target_modules in another order, rank 16 above the k/v width's share, s = 0.5
    "lora_deepseek_attn": dict(base="deepseek_f32_normtopk_gqa2", targets=("v_proj", "q_proj", "o_proj", "k_proj"),
                               rank=16, alpha=8),
    # gate/up/down: the dense layer 0, routed experts and the 2-wide shared expert of layers 1, 2
    "lora_deepseek_experts": dict(base="deepseek_f32_shared", targets=DS_FFN, rank=8, alpha=16),
    # bf16 base (GQA 4, head_dim 6, sharded), every target, rslora, the adapter stored as BF16
    "lora_mixtral_bf16_all": dict(base="mixtral_bf16_gqa4", targets=ATTN + MIX_FFN, rank=8, alpha=16, rslora=True,
                                  adapter_dtype="BF16"),
}

# ----------------------------------------------------------------------------- the format


def module_shapes(c):
    """Base-model Linear name (no .weight) -> (out, in) for every module LoRA may target, derived
    from the case's dimensions (the self-test checks it against the checkpoint's tensors)."""
    H, D = c["hidden"], hf.head_dim(c)
    qd, kvd = c["heads"] * D, c["kv_heads"] * D
    shapes = {}

    def mlp(prefix, width, names):
        g, u, d = names
        shapes[prefix + g], shapes[prefix + u], shapes[prefix + d] = (width, H), (width, H), (H, width)

    for l in range(c["layers"]):
        p = "model.layers.%d." % l
        for name, shape in (("q_proj", (qd, H)), ("k_proj", (kvd, H)), ("v_proj", (kvd, H)), ("o_proj", (H, qd))):
            shapes[p + "self_attn." + name] = shape
        if c["arch"] == "mixtral":
            for e in range(c["experts"]):
                mlp(p + "block_sparse_moe.experts.%d." % e, c["inter"], ("w1", "w3", "w2"))
        elif hf.is_moe_layer(c, l):
            for e in range(c["experts"]):
                mlp(p + "mlp.experts.%d." % e, c["moe_inter"], DS_FFN)
            if c["shared"]:
                mlp(p + "mlp.shared_experts.", c["shared"] * c["moe_inter"], DS_FFN)
        else:
            mlp(p + "mlp.", c["inter"], DS_FFN)
    return shapes


def targeted(c, targets):
    """The modules PEFT's target_modules list picks: name == target or ends with "." + target."""
    return {m: s for m, s in module_shapes(c).items() if any(m == t or m.endswith("." + t) for t in targets)}


def lora_scale(rank, alpha, use_rslora):
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def adapter_config(base_name, targets, rank, alpha, use_rslora):
    """As PEFT's LoraConfig.save_pretrained writes it (the keys a reader must accept and ignore
    included)."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "moemesh-tests/" + base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def tensor_name(module, part):
    """part: "A" or "B"."""
    return "%s%s.lora_%s.weight" % (PEFT_PREFIX, module, part)


def write_adapter_files(folder, config, entries):
    """config None: no adapter_config.json. entries: list of (name, st dtype, raw array)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    if config is not None:
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
    hf.write_safetensors(os.path.join(folder, "adapter_model.safetensors"), entries)


def random_adapter(c, rng, targets, rank, alpha, use_rslora=False, dtype="F32", base_name="base"):
    """Returns (adapter, entries): adapter = {"config", "scale", "modules": module -> (A, B) float64
    as stored}; entries the safetensors tensors. A ~ N(0, 1/in); B nonzero, scaled so that
    s * B @ A has entries of about DELTA_FRAC / sqrt(in)."""
    s = lora_scale(rank, alpha, use_rslora)
    modules, entries = {}, []
    for module, (out, inp) in targeted(c, targets).items():
        A = rng.standard_normal((rank, inp)) / math.sqrt(inp)
        B = rng.standard_normal((out, rank)) * DELTA_FRAC / (s * math.sqrt(rank))
        stored = []
        for part, a in (("A", A), ("B", B)):
            dt, raw, vals = hf.store(a, dtype)
            entries.append((tensor_name(module, part), dt, raw))
            stored.append(vals)
        modules[module] = tuple(stored)
    return {"config": adapter_config(base_name, targets, rank, alpha, use_rslora), "scale": s,
            "modules": modules}, entries


def write_adapter(folder, c, rng, targets, rank, alpha, use_rslora=False, dtype="F32", base_name="base"):
    """Writes a PEFT adapter folder for case c (hf.build_case's dict); returns the adapter (see
    random_adapter) with "folder" added."""
    adapter, entries = random_adapter(c, rng, targets, rank, alpha, use_rslora, dtype, base_name)
    write_adapter_files(folder, adapter["config"], entries)
    adapter["folder"] = folder
    return adapter


def merge(c, W, adapter):
    """The base weights with W + s * B @ A for every adapted module, in float64 (not rounded to
    the base dtype: serving applies the adapter unmerged). Other entries are W's own arrays."""
    Wm = dict(W)
    s = adapter["scale"]
    for module, (A, B) in adapter["modules"].items():
        name = module + ".weight"
        Wm[name] = W[name] + s * (B @ A)
    return Wm


def bf16(a):
    """Values rounded to bfloat16 (through float32, round to nearest even), as float64."""
    return hf.bf16_to_f32(hf.bf16_bits(a)).astype(np.float64)


@contextlib.contextmanager
def low_precision_base_rule(c, W, Wm, adapter):
    """On a BF16 base the server keeps an adapter in bf16 (as vLLM keeps adapters in the model's
    dtype: `core/lora.h` lora_dtype_for), so x · W'ᵀ of a merged module is evaluated as the server
    computes it: bf16(x) · Wᵀ + (bf16(x) · Aᵀ) · bf16(s·B)ᵀ, the products with A and W rounding
    their input to bf16 as every product with bf16 weights does, the rank-long intermediate kept
    in float32 (cpu::LowRankJob), and s·B formed in float32. Rounding x once for the whole merged sum
    is another computation (on lora_mixtral_bf16_all its logits differ by 3.7e-3 median)."""
    if c["dtype"] != "BF16":
        yield
        return
    s = np.float32(adapter["scale"])
    parts = {}
    for module, (A, B) in adapter["modules"].items():
        name = module + ".weight"
        parts[id(Wm[name])] = (W[name], bf16(A), bf16(B.astype(np.float32) * s))
    plain = hf.matmul

    def matmul(cc, x, w):
        if id(w) not in parts:
            return plain(cc, x, w)
        w0, a, b = parts[id(w)]
        return plain(cc, x, w0) + (bf16(x) @ a.T) @ b.T

    hf.matmul = matmul
    try:
        yield
    finally:
        hf.matmul = plain


# ----------------------------------------------------------------------------- cases


def effect(c, W, Wm, prompt):
    """Per-row rel difference between the merged and the base reference over the prompt."""
    gt = c.get("gating", 1.0)
    base, lora = hf.forward(c, W, prompt, gt), hf.forward(c, Wm, prompt, gt)
    return [hf.rel(lora[i], base[i]) for i in range(len(prompt))]


def build_case(name, workdir, seed):
    """Base checkpoint (workdir/<base case>) and adapter (workdir/<name>-adapter)."""
    lc = CASES[name]
    c, folder, W, prompt = hf.build_case(lc["base"], workdir, seed)
    rng = np.random.default_rng([seed, 16])
    adapter = write_adapter(os.path.join(workdir, name + "-adapter"), c, rng, lc["targets"], lc["rank"],
                            lc["alpha"], lc.get("rslora", False), lc.get("adapter_dtype", "F32"), lc["base"])
    return c, folder, W, prompt, adapter


def check_effect(name, c, W, Wm, prompt):
    e = effect(c, W, Wm, prompt)
    if min(e) < MIN_EFFECT:
        print("%s: the adapter is too weak: merged vs base logits rel diff %.3g (row %d) < %g" %
              (name, min(e), int(np.argmin(e)), MIN_EFFECT))
        return False
    return True


def check_case(cli, name, workdir, seed):
    c, folder, W, prompt, adapter = build_case(name, workdir, seed)
    Wm = merge(c, W, adapter)
    with low_precision_base_rule(c, W, Wm, adapter):
        if not check_effect(name, c, W, Wm, prompt):
            return False
        return hf.compare_case(cli, name, c, folder, Wm, prompt, ["--lora", adapter["folder"]])


# ----------------------------------------------------------------------------- error cases

ERR_BASE = "mixtral_f32_mha"  # 2 layers
ERR_EXPERT = "model.layers.1.block_sparse_moe.experts.2.w2"  # in = inter 48
ERR_MISSING_LAYER = "model.layers.2.self_attn.q_proj"  # layer 2 of a 2-layer model


def set_key(key, value):
    def f(cfg, entries):
        cfg[key] = value
    return f


def widen_a(cfg, entries):
    """lora_A of ERR_EXPERT gets one input column more than the base weight has."""
    name = tensor_name(ERR_EXPERT, "A")
    for i, (n, dt, raw) in enumerate(entries):
        if n == name:
            entries[i] = (n, dt, np.concatenate([raw, np.zeros((raw.shape[0], 1), raw.dtype)], axis=1))
            return
    raise KeyError(name)


def add_missing_layer(cfg, entries):
    """A well-shaped q_proj pair for a layer the model does not have."""
    r = entries[0][2].shape[0]
    H = hf.CASES[ERR_BASE]["hidden"]
    entries.append((tensor_name(ERR_MISSING_LAYER, "A"), "F32", np.full((r, H), 0.01, np.float32)))
    entries.append((tensor_name(ERR_MISSING_LAYER, "B"), "F32", np.full((H, r), 0.01, np.float32)))


def drop_config(cfg, entries):
    return "no config"


# (label, how it breaks a valid adapter, substrings of which the one error line must hold one,
# case-insensitive match). "valid" is the control: the same adapter unbroken must load (exit 0).
ERRORS = [
    ("valid", None, (), False),
    ("modules_to_save", set_key("modules_to_save", ["lm_head"]), ("modules_to_save",), False),
    ("lora_A_in_dim", widen_a, (tensor_name(ERR_EXPERT, "A"),), False),
    ("use_dora", set_key("use_dora", True), ("dora",), True),
    ("layer_past_end", add_missing_layer,
     (tensor_name(ERR_MISSING_LAYER, "A"), tensor_name(ERR_MISSING_LAYER, "B")), False),
    ("no_adapter_config", drop_config, ("adapter_config.json",), False),
    ("bias_all", set_key("bias", "all"), ("bias",), False),
]


def write_errors(workdir, seed):
    """Writes the base checkpoint and the adapters; returns (base folder, [(label, folder, wants, ci)])."""
    c, folder, _, _ = hf.build_case(ERR_BASE, workdir, seed)
    written = []
    for label, breaks, wants, ci in ERRORS:
        adapter, entries = random_adapter(c, np.random.default_rng([seed, 16, 1]), ATTN + MIX_FFN, 4, 8,
                                          base_name=ERR_BASE)
        cfg = json.loads(json.dumps(adapter["config"]))
        if breaks is not None and breaks(cfg, entries) == "no config":
            cfg = None
        out = os.path.join(workdir, "lora_errors", label)
        write_adapter_files(out, cfg, entries)
        written.append((label, out, wants, ci))
    return folder, written


def check_errors(cli, workdir, seed):
    base, written = write_errors(workdir, seed)
    ok = True
    for label, folder, wants, ci in written:
        rc, _, err = hf.run_cli(cli, ["generate", "--model", base, "--lora", folder, "--prompt-ids", "1,2",
                                      "--max-tokens", "1"])
        if label == "valid":
            if rc != 0:
                print("lora_errors: the unbroken adapter failed (%d): %s" % (rc, err.strip()))
                ok = False
            continue
        lines = err.strip().splitlines()
        line = lines[0] if len(lines) == 1 else ""
        hay = line.lower() if ci else line
        if rc != 1 or len(lines) != 1 or not any((w.lower() if ci else w) in hay for w in wants):
            print("lora_errors: %s: want exit 1 and one line naming %s; got rc %d, stderr %r" %
                  (label, " or ".join(repr(w) for w in wants), rc, err))
            ok = False
    print("lora_errors: %d broken adapters and a valid one: %s" % (len(ERRORS) - 1, "ok" if ok else "FAILED"))
    return ok


# ----------------------------------------------------------------------------- self-test

expect = gq.expect
NAME_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|"
                     r"block_sparse_moe\.experts\.\d+\.w[123]|mlp\.experts\.\d+\.(?:gate|up|down)_proj|"
                     r"mlp\.shared_experts\.(?:gate|up|down)_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")


def self_test_merge():
    """merge against a direct evaluation of the LoRA'd Linear, x W'^T == x W^T + s (x A^T) B^T."""
    rng = np.random.default_rng(3)
    out, inp, r = 24, 40, 6
    W = {"m.weight": rng.standard_normal((out, inp)) / math.sqrt(inp), "other.weight": rng.standard_normal((3, 3))}
    A, B = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
    x = rng.standard_normal((7, inp))
    for rslora, want in ((False, 12.0 / 6), (True, 12.0 / math.sqrt(6))):
        s = lora_scale(r, 12.0, rslora)
        expect(abs(s - want) < 1e-15, "scale with use_rslora %s: %r" % (rslora, s))
        Wm = merge({"dtype": "F32"}, W, {"scale": s, "modules": {"m": (A, B)}})
        direct = x @ W["m.weight"].T + s * (x @ A.T) @ B.T
        expect(np.allclose(x @ Wm["m.weight"].T, direct, rtol=1e-12, atol=1e-12), "merged Linear, rslora %s" % rslora)
        expect(Wm["other.weight"] is W["other.weight"], "an unadapted module changed")
        expect(W["m.weight"] is not Wm["m.weight"], "merge wrote into W")
    # A BF16 base: merged modules evaluate as the server computes them with a bf16 adapter; other
    # modules as before.
    Wb = {"m.weight": hf.store(W["m.weight"], "BF16")[2], "other.weight": W["other.weight"]}
    ad = {"scale": 0.5, "modules": {"m": (A, B)}}
    Wm = merge({"dtype": "BF16"}, Wb, ad)
    cb = {"dtype": "BF16"}
    with low_precision_base_rule(cb, Wb, Wm, ad):
        got = hf.matmul(cb, x, Wm["m.weight"])
        other = hf.matmul(cb, x[:, :3], Wm["other.weight"])
    want = bf16(x) @ Wb["m.weight"].T + (bf16(x) @ bf16(A).T) @ bf16(np.float32(0.5) * B.astype(np.float32)).T
    expect(np.allclose(got, want, rtol=1e-12, atol=1e-12), "BF16 base: merged module not evaluated as the server does")
    expect(np.max(np.abs(got - (x @ Wm["m.weight"].T))) > 1e-4, "BF16 base: the rule changed nothing")
    expect(np.allclose(other, bf16(x[:, :3]) @ W["other.weight"].T), "BF16 base: an unadapted module changed rule")


def self_test_case(name, workdir):
    lc = CASES[name]
    c, folder, W, prompt, adapter = build_case(name, workdir, 0)
    shapes = module_shapes(c)
    for m, shape in shapes.items():
        expect(W[m + ".weight"].shape == shape, "%s: module_shapes says %s, checkpoint %s" %
               (m, shape, W[m + ".weight"].shape))
    # Every Linear of the checkpoint with a targeted short name is adapted (PEFT's suffix match).
    linears = [n[:-len(".weight")] for n, a in W.items() if a.ndim == 2 and n.startswith("model.layers.")]
    picked = [m for m in linears if m.rsplit(".", 1)[1] in lc["targets"]]
    expect(sorted(picked) == sorted(adapter["modules"]), name + ": adapted modules != the targeted Linears")
    with open(os.path.join(adapter["folder"], "adapter_config.json")) as f:
        cfg = json.load(f)
    expect(cfg == adapter["config"], name + ": adapter_config.json")
    expect(cfg["peft_type"] == "LORA" and cfg["r"] == lc["rank"] and cfg["lora_alpha"] == lc["alpha"] and
           cfg["use_rslora"] == lc.get("rslora", False) and sorted(cfg["target_modules"]) == sorted(lc["targets"]),
           name + ": config fields")
    t = gq.read_safetensors(os.path.join(adapter["folder"], "adapter_model.safetensors"))
    expect(len(t) == 2 * len(adapter["modules"]),
           name + ": %d tensors for %d modules" % (len(t), len(adapter["modules"])))
    dtype, r = lc.get("adapter_dtype", "F32"), lc["rank"]
    kinds = set()
    for tname, (dt, raw) in t.items():
        mm = NAME_RE.match(tname)
        expect(mm is not None, "%s: not a PEFT LoRA tensor name" % tname)
        expect(int(mm.group(1)) < c["layers"], tname + ": layer")
        module = tname[len(PEFT_PREFIX):tname.index(".lora_")]
        kinds.add(re.sub(r"\.\d+\.", ".E.", re.sub(r"^model\.layers\.\d+\.", "", module)))
        out, inp = W[module + ".weight"].shape
        part = mm.group(3)
        want = (r, inp) if part == "A" else (out, r)
        expect(dt == dtype and raw.shape == want, "%s: %s %s, want %s %s" % (tname, dt, raw.shape, dtype, want))
        vals = hf.bf16_to_f32(raw) if dt == "BF16" else raw
        expect(np.array_equal(vals.astype(np.float64), adapter["modules"][module][0 if part == "A" else 1]),
               tname + ": values read back differ")
    if name == "lora_deepseek_experts":
        for kind in ("mlp.gate_proj", "mlp.experts.E.down_proj", "mlp.shared_experts.up_proj"):
            expect(kind in kinds, name + ": no " + kind)
    s = adapter["scale"]
    deltas = [np.std(s * B @ A) * math.sqrt(A.shape[1]) for A, B in adapter["modules"].values()]
    Wm = merge(c, W, adapter)
    e = effect(c, W, Wm, prompt)
    expect(min(e) >= MIN_EFFECT, "%s: the adapter is too weak (rel %.3g)" % (name, min(e)))
    print("self-test: %s: %d modules (%s), r %d, s %.3g, delta std*sqrt(in) %.3g..%.3g, "
          "merged vs base logits rel %.3g..%.3g" % (name, len(adapter["modules"]), ", ".join(sorted(kinds)), r, s,
                                                   min(deltas), max(deltas), min(e), max(e)))


def self_test_errors(workdir):
    _, written = write_errors(workdir, 0)
    for label, folder, _, _ in written:
        t = gq.read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
        has_cfg = os.path.exists(os.path.join(folder, "adapter_config.json"))
        expect(has_cfg == (label != "no_adapter_config"), label + ": adapter_config.json")
        if label == "lora_A_in_dim":
            expect(t[tensor_name(ERR_EXPERT, "A")][1].shape[1] == hf.CASES[ERR_BASE]["inter"] + 1, label)
        if label == "layer_past_end":
            expect(tensor_name(ERR_MISSING_LAYER, "B") in t, label)
    print("self-test: %d lora_errors adapters written and read back" % len(written))


def self_test():
    self_test_merge()
    print("self-test: merge == direct LoRA evaluation (scale alpha/r and alpha/sqrt(r)), 16-bit rounding: ok")
    workdir = tempfile.mkdtemp(prefix="moemesh-lora-")
    try:
        for name in CASES:
            self_test_case(name, workdir)
        self_test_errors(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("self-test: ok")


# ----------------------------------------------------------------------------- main


def main():
    hf.sibling_main(CASES, "lora_errors", build_case, write_errors, check_case, check_errors, self_test,
                    "only the NumPy checks (no --cli)")


if __name__ == "__main__":
    main()
