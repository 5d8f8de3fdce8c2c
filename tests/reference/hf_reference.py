#!/usr/bin/python3
"""Independent NumPy reference for `moemesh generate`.

For each case this script
  (a) writes a random Hugging Face checkpoint itself (its own safetensors writer: config.json +
      model.safetensors, or shards + model.safetensors.index.json; F32, F16 or BF16; the tensor
      names transformers' MixtralForCausalLM / DeepSeek's DeepseekForCausalLM save),
  (b) runs `moemesh generate --json --logits --ignore-eos --prompt-ids ...` (greedy),
  (c) recomputes the forward pass in NumPy float64 on the same (rounded) weights along the
      token path C++ chose, and compares every logits row (the last prompt position and every
      generated position) with  rel = max|cpp - ref| / max|ref|  per row, and checks that each
      generated token is NumPy's argmax too (a near tie, top-2 gap under the case's bound, is reported,
      not failed).

Usage: hf_reference.py --cli PATH [--case NAME ...] [--workdir DIR] [--keep]
       hf_reference.py --write-only --workdir DIR --case NAME   (just write a checkpoint)
Exits non-zero when a case fails. Run with /usr/bin/python3 (it has numpy).
"""
import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

REL_TOL = 1e-4
NEAR_TIE = 1e-4
# BF16 weights multiply x rounded to bf16 on both sides (matmul() below). Where an activation sits
# within its f32-vs-f64 difference of a bf16 rounding boundary the two round it one bf16 step
# (2^-8) apart, and that row's logits move by ~1e-3; the other rows still agree to ~1e-7. So
# BF16 cases get a looser bound per row, and their median row must meet REL_TOL: a reference
# that rounded differently (or not at all) would miss it on every row.
REL_TOL_BF16 = 5e-3

# ----------------------------------------------------------------------------- safetensors


def bf16_bits(a):
    """float32 -> bfloat16 bits, round to nearest even (what torch's .to(bfloat16) does)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def store(a, dtype):
    """Returns (safetensors dtype, raw array to write, float64 values as stored)."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "F32":
        return "F32", a, a.astype(np.float64)
    if dtype == "F16":
        h = a.astype(np.float16)
        return "F16", h, h.astype(np.float64)
    if dtype == "BF16":
        b = bf16_bits(a)
        return "BF16", b, bf16_to_f32(b).astype(np.float64)
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, st_dtype, raw ndarray). Layout as the safetensors crate writes it:
    u64 little-endian header size, JSON header padded with spaces to 8 bytes, then the data."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    blobs = []
    for name, dt, raw in tensors:
        data = np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(raw.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return offset


def write_checkpoint(folder, config, tensors, dtype, shards):
    """tensors: ordered dict name -> float32 array. Returns name -> float64 values as stored."""
    stored, entries = {}, []
    for name, a in tensors.items():
        dt, raw, vals = store(a, dtype)
        stored[name] = vals
        entries.append((name, dt, raw))
    write_entries(folder, config, entries, shards)
    return stored


def write_entries(folder, config, entries, shards):
    """entries: list of (name, st_dtype, raw ndarray), already in their stored form."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), entries)
        return
    per = math.ceil(len(entries) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = "model-%05d-of-%05d.safetensors" % (s + 1, shards)
        part = entries[s * per:(s + 1) * per]
        total += write_safetensors(os.path.join(folder, fname), part)
        for name, _, _ in part:
            weight_map[name] = fname
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ----------------------------------------------------------------------------- models


def mixtral_config(c):
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": c["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": c["inter"],
        "max_position_embeddings": c.get("max_pos", 512),
        "model_type": "mixtral",
        "num_attention_heads": c["heads"],
        "num_experts_per_tok": c["topk"],
        "num_hidden_layers": c["layers"],
        "num_key_value_heads": c["kv_heads"],
        "num_local_experts": c["experts"],
        "output_router_logits": False,
        "rms_norm_eps": c.get("eps", 1e-5),
        "rope_theta": c.get("rope_theta", 1e6),
        "router_aux_loss_coef": 0.02,
        "router_jitter_noise": 0.0,
        "sliding_window": c.get("window"),
        "tie_word_embeddings": c.get("tied", False),
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[c["dtype"]],
        "transformers_version": "4.46.0",
        "use_cache": True,
        "vocab_size": c["vocab"],
    }
    if "head_dim" in c:
        cfg["head_dim"] = c["head_dim"]
    if "rope_scaling" in c:
        cfg["rope_scaling"] = c["rope_scaling"]
    return cfg


def deepseek_config(c):
    cfg = {
        "architectures": ["DeepseekForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "first_k_dense_replace": c["first_dense"],
        "hidden_act": "silu",
        "hidden_size": c["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": c["inter"],
        "max_position_embeddings": c.get("max_pos", 512),
        "model_type": "deepseek",
        "moe_intermediate_size": c["moe_inter"],
        "moe_layer_freq": 1,
        "n_routed_experts": c["experts"],
        "n_shared_experts": c["shared"],
        "norm_topk_prob": c["norm_topk"],
        "num_attention_heads": c["heads"],
        "num_experts_per_tok": c["topk"],
        "num_hidden_layers": c["layers"],
        "num_key_value_heads": c["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": c.get("eps", 1e-6),
        "rope_scaling": c.get("rope_scaling"),
        "rope_theta": c.get("rope_theta", 10000.0),
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": c.get("tied", False),
        "torch_dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[c["dtype"]],
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": c["vocab"],
    }
    if "scaling" in c:
        cfg["routed_scaling_factor"] = c["scaling"]
    return cfg


def head_dim(c):
    return c.get("head_dim", c["hidden"] // c["heads"])


def is_moe_layer(c, layer):
    if c["arch"] == "mixtral":
        return True
    return layer >= c["first_dense"]  # moe_layer_freq 1


def random_tensors(c, rng):
    """State-dict order and names as transformers saves them."""
    H, D, V = c["hidden"], head_dim(c), c["vocab"]
    qd, kvd = c["heads"] * D, c["kv_heads"] * D
    t = {}

    def lin(name, out, inp, scale=1.0):
        t[name] = (rng.standard_normal((out, inp)) * scale / math.sqrt(inp)).astype(np.float32)

    def norm(name):
        t[name] = (1.0 + 0.2 * rng.standard_normal(H)).astype(np.float32)

    def mlp(prefix, width, names):
        lin(prefix + names[0] + ".weight", width, H)
        lin(prefix + names[1] + ".weight", width, H)
        lin(prefix + names[2] + ".weight", H, width)

    t["model.embed_tokens.weight"] = rng.standard_normal((V, H)).astype(np.float32)
    for l in range(c["layers"]):
        p = "model.layers.%d." % l
        lin(p + "self_attn.q_proj.weight", qd, H, 1.5)
        lin(p + "self_attn.k_proj.weight", kvd, H, 1.5)
        lin(p + "self_attn.v_proj.weight", kvd, H)
        lin(p + "self_attn.o_proj.weight", H, qd)
        if c["arch"] == "mixtral":
            lin(p + "block_sparse_moe.gate.weight", c["experts"], H, 2.0)
            for e in range(c["experts"]):
                # Mixtral: w1 = gate, w2 = down, w3 = up; saved in that name order
                ep = p + "block_sparse_moe.experts.%d." % e
                lin(ep + "w1.weight", c["inter"], H)
                lin(ep + "w2.weight", H, c["inter"])
                lin(ep + "w3.weight", c["inter"], H)
        elif is_moe_layer(c, l):
            for e in range(c["experts"]):
                mlp(p + "mlp.experts.%d." % e, c["moe_inter"], ("gate_proj", "up_proj", "down_proj"))
            lin(p + "mlp.gate.weight", c["experts"], H, 2.0)
            if c["shared"]:
                mlp(p + "mlp.shared_experts.", c["shared"] * c["moe_inter"], ("gate_proj", "up_proj", "down_proj"))
        else:
            mlp(p + "mlp.", c["inter"], ("gate_proj", "up_proj", "down_proj"))
        norm(p + "input_layernorm.weight")
        norm(p + "post_attention_layernorm.weight")
    norm("model.norm.weight")
    if not c.get("tied", False):
        lin("lm_head.weight", V, H, 4.0)
    return t


# ----------------------------------------------------------------------------- NumPy forward


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def yarn_mscale(scale, m):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def rope_params(cfg, D, seq_len):
    """(inv_freq [D/2], attention factor) as transformers' modeling_rope_utils computes them for a
    forward call over positions 0 .. seq_len-1 (only "dynamic" depends on seq_len); yarn as
    DeepSeek's modelling code: the factor from rope_scaling, mscale / mscale_all_dim."""
    base = cfg["rope_theta"]
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    max_pos = cfg["max_position_embeddings"]
    idx = np.arange(0, D, 2, dtype=np.float64) / D
    if kind == "dynamic":
        f = rs["factor"]
        L = max(seq_len, max_pos)
        base = base * ((f * L / max_pos) - (f - 1)) ** (D / (D - 2))
    inv = 1.0 / base ** idx
    att = 1.0
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "yarn":
        f = rs["factor"]
        orig = rs.get("original_max_position_embeddings", max_pos)

        def corr(rot):
            return D * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = math.floor(corr(rs.get("beta_fast", 32))), math.ceil(corr(rs.get("beta_slow", 1)))
        low, high = max(low, 0), min(high, D - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(D // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extra = 1 - ramp
        inv = (inv / f) * (1 - extra) + inv * extra
        att = rs.get("attention_factor") or (yarn_mscale(f, rs.get("mscale", 1)) /
                                             yarn_mscale(f, rs.get("mscale_all_dim", 0)))
    elif kind == "llama3":
        f, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv, att


def score_scale(c, D):
    """1/sqrt(D), and DeepSeek(-V2/V3)'s softmax_scale under yarn: times mscale(factor, mscale_all_dim)^2."""
    s = 1.0 / math.sqrt(D)
    rs = c["config"].get("rope_scaling") or {}
    if c["arch"] == "deepseek" and rs.get("rope_type", rs.get("type")) == "yarn" and rs.get("mscale_all_dim"):
        s *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return s


def rope(x, pos, theta, cfg=None, call_len=None):
    """x [T, heads, D]; HF rotate_half: pairs (i, i + D/2). call_len[t]: the length of the forward
    call that computed position t (dynamic scaling: a position keeps the rotation it got then)."""
    D = x.shape[-1]
    if cfg is None:
        cfg = {"rope_theta": theta, "max_position_embeddings": 1}
    if call_len is None:
        call_len = np.full(len(pos), len(pos))
    ang = np.zeros((len(pos), D // 2))
    att = np.ones((len(pos), 1))
    for t in range(len(pos)):
        inv, a = rope_params(cfg, D, int(call_len[t]))
        ang[t] = float(pos[t]) * inv
        att[t] = a
    emb = np.concatenate([ang, ang], axis=-1)
    cos, sin = (np.cos(emb) * att)[:, None, :], (np.sin(emb) * att)[:, None, :]
    rot = np.concatenate([-x[..., D // 2:], x[..., :D // 2]], axis=-1)
    return x * cos + rot * sin


def silu(x):
    return x / (1.0 + np.exp(-x))


def matmul(c, x, w):
    """x · wᵀ. BF16 weights multiply x rounded to bf16 (f32, then round to nearest even), as
    torch's bf16 matmul, cuBLAS, oneDNN and llama.cpp do, and as moemesh's kernels do."""
    if c["dtype"] == "BF16":
        x = bf16_to_f32(bf16_bits(x)).astype(np.float64)
    return x @ w.T


def forward(c, W, ids, gating_temperature, prompt_len=None):
    """Logits [T, vocab] of every position of ids (float64). prompt_len: ids[:prompt_len] were one
    forward call, each later id a call of its own (what `moemesh generate` runs; only dynamic RoPE
    scaling can tell)."""
    cfg = c["config"]
    H, D = c["hidden"], head_dim(c)
    nh, nkv = c["heads"], c["kv_heads"]
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    pos = np.arange(T)
    P = prompt_len or T
    call_len = np.array([P if t < P else t + 1 for t in range(T)])
    x = W["model.embed_tokens.weight"][np.array(ids)]
    window = c.get("window")
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    allowed = j <= i
    if window:
        allowed &= j > i - window
    for l in range(c["layers"]):
        p = "model.layers.%d." % l
        h = rmsnorm(x, W[p + "input_layernorm.weight"], eps)
        q = matmul(c, h, W[p + "self_attn.q_proj.weight"]).reshape(T, nh, D)
        k = matmul(c, h, W[p + "self_attn.k_proj.weight"]).reshape(T, nkv, D)
        v = matmul(c, h, W[p + "self_attn.v_proj.weight"]).reshape(T, nkv, D)
        q, k = rope(q, pos, None, cfg, call_len), rope(k, pos, None, cfg, call_len)
        out = np.zeros((T, nh, D))
        for hh in range(nh):
            g = hh // (nh // nkv)
            s = q[:, hh, :] @ k[:, g, :].T * score_scale(c, D)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            out[:, hh, :] = s @ v[:, g, :]
        x = x + matmul(c, out.reshape(T, nh * D), W[p + "self_attn.o_proj.weight"])
        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"], eps)
        x = x + ffn(c, W, l, h, gating_temperature)
    x = rmsnorm(x, W["model.norm.weight"], eps)
    lm = W["model.embed_tokens.weight"] if c.get("tied") else W["lm_head.weight"]
    return matmul(c, x, lm)


def ffn(c, W, l, h, gt):
    p = "model.layers.%d." % l

    def mlp(prefix, names, xs):
        g, u, d = names
        gu = silu(matmul(c, xs, W[prefix + g + ".weight"])) * matmul(c, xs, W[prefix + u + ".weight"])
        return matmul(c, gu, W[prefix + d + ".weight"])

    if c["arch"] == "mixtral":
        gate, names, eprefix = p + "block_sparse_moe.gate.weight", ("w1", "w3", "w2"), p + "block_sparse_moe.experts."
    else:
        names = ("gate_proj", "up_proj", "down_proj")
        if not is_moe_layer(c, l):
            return mlp(p + "mlp.", names, h)
        gate, eprefix = p + "mlp.gate.weight", p + "mlp.experts."
    logits = matmul(c, h, W[gate]) / gt
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    k = c["topk"]
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, idx, axis=-1)
    if c["arch"] == "mixtral":
        w = w / w.sum(axis=-1, keepdims=True)
    else:
        if c["norm_topk"] and k > 1:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
        w = w * c.get("scaling", 1.0)
    y = np.zeros_like(h)
    for r in range(h.shape[0]):
        for s in range(k):
            y[r] += w[r, s] * mlp(eprefix + "%d." % idx[r, s], names, h[r:r + 1])[0]
    if c["arch"] == "deepseek" and c["shared"]:
        y = y + mlp(p + "mlp.shared_experts.", names, h)
    return y


# ----------------------------------------------------------------------------- cases

BASE_MIX = dict(arch="mixtral", vocab=96, hidden=32, inter=48, layers=2, heads=4, kv_heads=4, experts=4, topk=2)
BASE_DS = dict(arch="deepseek", vocab=96, hidden=32, inter=64, moe_inter=16, layers=3, heads=4, kv_heads=4,
               experts=6, topk=3, shared=2, first_dense=1, norm_topk=False)

CASES = {
    # GQA ratio 1, one safetensors file
    "mixtral_f32_mha": dict(BASE_MIX, dtype="F32", shards=1, prompt=9),
    # GQA ratio 2, sliding window 6 < 9 + 32 tokens, sharded, gating temperature 0.5
    "mixtral_f32_gqa2_window": dict(BASE_MIX, dtype="F32", kv_heads=2, window=6, shards=3, prompt=9, gating=0.5),
    # GQA ratio 4 with an explicit head_dim != hidden/heads, bf16 weights
    "mixtral_bf16_gqa4": dict(BASE_MIX, dtype="BF16", heads=8, kv_heads=2, head_dim=6, shards=2, prompt=12),
    # f16 weights, tied embeddings, gating temperature 2, top-1 routing
    "mixtral_f16_tied": dict(BASE_MIX, dtype="F16", tied=True, topk=1, shards=1, prompt=7, gating=2.0),
    # first_k_dense_replace 1, 2 shared experts, norm_topk_prob false, routed_scaling_factor 1.5
    "deepseek_f32_shared": dict(BASE_DS, dtype="F32", scaling=1.5, shards=1, prompt=10),
    # norm_topk_prob true, GQA 2, sliding window absent, sharded, gating temperature 2
    "deepseek_f32_normtopk_gqa2": dict(BASE_DS, dtype="F32", norm_topk=True, kv_heads=2, shards=2, prompt=8,
                                       gating=2.0),
    # bf16 with norm_topk_prob true and one shared expert
    "deepseek_bf16_norm": dict(BASE_DS, dtype="BF16", norm_topk=True, shared=1, shards=1, prompt=11),
    # f16 with gating temperature 0.5, no shared experts
    "deepseek_f16_noshared": dict(BASE_DS, dtype="F16", shared=0, shards=1, prompt=6, gating=0.5),
    # RoPE scaling (issue #15): an original window of 16 positions, prompt + generated tokens up to
    # 64 = 4x it; head_dim 8 with theta 10000 puts wavelengths on both sides of the window.
    "rope_linear": dict(BASE_MIX, dtype="F32", kv_heads=2, shards=1, prompt=24, gen=40, max_pos=16,
                        rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0}),
    # dynamic NTK: the base grows with each call's length (the prompt's 24, then 25, 26, ...)
    "rope_dynamic": dict(BASE_DS, dtype="F32", shards=1, prompt=24, gen=40, max_pos=16,
                         rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    # DeepSeek-V2/V3's yarn: mscale != mscale_all_dim (cos/sin scaled) and the softmax scale
    # multiplied by mscale(factor, mscale_all_dim)^2
    "rope_yarn": dict(BASE_DS, dtype="F32", kv_heads=2, shards=1, prompt=24, gen=40, max_pos=64, rope_theta=500.0,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                    "beta_fast": 8, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}),
    # yarn on Mixtral: the default attention factor mscale(factor), no softmax-scale change
    "rope_yarn_mixtral": dict(BASE_MIX, dtype="F32", shards=1, prompt=24, gen=40, max_pos=64, rope_theta=500.0,
                              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "rope_llama3": dict(BASE_MIX, dtype="F32", kv_heads=2, shards=1, prompt=24, gen=40, max_pos=64,
                        rope_theta=10000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}
GEN_TOKENS = 32


def build_case(name, workdir, seed):
    c = dict(CASES[name])
    c["config"] = mixtral_config(c) if c["arch"] == "mixtral" else deepseek_config(c)
    rng = np.random.default_rng(seed)
    tensors = random_tensors(c, rng)
    folder = os.path.join(workdir, name)
    shutil.rmtree(folder, ignore_errors=True)
    W = write_checkpoint(folder, c["config"], tensors, c["dtype"], c["shards"])
    prompt = [int(v) for v in rng.integers(3, c["vocab"], size=c["prompt"])]
    return c, folder, W, prompt


def run_cli(cli, args):
    r = subprocess.run([cli] + args, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def check_case(cli, name, workdir, seed=0):
    c, folder, W, prompt = build_case(name, workdir, seed)
    return compare_case(cli, name, c, folder, W, prompt)


def compare_case(cli, name, c, folder, W, prompt, extra_args=()):
    """Runs moemesh on the checkpoint in folder (plus extra_args on its command line) and compares
    it with forward(c, W, ...)."""
    gen = c.get("gen", GEN_TOKENS)
    args = ["generate", "--model", folder, "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens",
            str(gen), "--ignore-eos", "--json", "--logits"]
    gt = c.get("gating", 1.0)
    if "gating" in c:
        args += ["--gating-temperature", str(gt)]
    args += list(extra_args)
    rc, out, err = run_cli(cli, args)
    if rc != 0:
        print("%s: moemesh generate failed (%d): %s" % (name, rc, err.strip()))
        return False
    res = json.loads(out)
    if res["prompt_ids"] != prompt:
        print("%s: prompt_ids %s != %s" % (name, res["prompt_ids"], prompt))
        return False
    outs = res["output_ids"]
    logits = np.array(res["logits"], dtype=np.float64)
    ok = True
    if len(outs) != gen or logits.shape != (gen + 1, c["vocab"]):
        print("%s: expected %d tokens and %d logits rows, got %d and %s" %
              (name, gen, gen + 1, len(outs), logits.shape))
        return False
    # The reference along the C++ path: positions P-1 .. P+n-1 of prompt + output.
    ref = forward(c, W, prompt + outs, gt, len(prompt))[len(prompt) - 1:]
    errs = [rel(logits[i], ref[i]) for i in range(len(ref))]
    worst = max(errs)
    tol = REL_TOL_BF16 if c["dtype"] == "BF16" else REL_TOL
    near_tie = max(NEAR_TIE, tol)
    ties = []
    for i, tok in enumerate(outs):
        order = np.argsort(-ref[i], kind="stable")
        if order[0] != tok:
            gap = (ref[i][order[0]] - ref[i][tok]) / np.max(np.abs(ref[i]))
            if gap < near_tie:
                ties.append((i, tok, int(order[0]), gap))
            else:
                print("%s: step %d: C++ chose %d, NumPy argmax is %d (gap %.3g)" % (name, i, tok, order[0], gap))
                ok = False
    if worst > tol:
        i = int(np.argmax(errs))
        print("%s: logits row %d (position %d) rel err %.3g > %g" % (name, i, len(prompt) - 1 + i, worst, tol))
        ok = False
    if float(np.median(errs)) > REL_TOL:
        print("%s: median rel err %.3g > %g" % (name, float(np.median(errs)), REL_TOL))
        ok = False
    # The smallest top-2 gap along the path says how safe the greedy comparison is.
    gaps = []
    for i in range(len(outs)):
        top2 = np.sort(ref[i])[-2:]
        gaps.append((top2[1] - top2[0]) / np.max(np.abs(ref[i])))
    print("%s: %s, %d layers, %d prompt + %d generated tokens: max rel err %.3g (mean %.3g, "
          "median %.3g), greedy path %s, min top-2 gap %.3g%s" %
          (name, c["dtype"], c["layers"], len(prompt), len(outs), worst, float(np.mean(errs)), float(np.median(errs)),
           "identical" if ok and not ties else ("near ties %s" % ties if ok else "DIFFERS"), min(gaps),
           "" if ok else "  FAILED"))
    return ok


def check_cli_errors(cli, workdir):
    """Bad model folder and bad flags: exit 1, one readable line."""
    ok = True
    for args, want in [
        (["generate", "--model", os.path.join(workdir, "no-such-model"), "--prompt-ids", "1,2"], "no-such-model"),
        (["generate", "--model", os.path.join(workdir, "mixtral_f32_mha"), "--prompt-ids", "1,x"], "prompt-ids"),
        (["generate", "--model", os.path.join(workdir, "mixtral_f32_mha"), "--prompt-ids", "1,500"], "500"),
        (["generate", "--model", os.path.join(workdir, "mixtral_f32_mha"), "--prompt-ids", "1,2", "--top-p", "0"],
         "top_p"),
    ]:
        rc, out, err = run_cli(cli, args)
        lines = err.strip().splitlines()
        if rc != 1 or len(lines) != 1 or want not in lines[0]:
            print("cli_errors: %s -> rc %d, stderr %r" % (" ".join(args[3:]), rc, err))
            ok = False
    print("cli_errors: %s" % ("ok" if ok else "FAILED"))
    return ok


def check_cli_sampling(cli, workdir):
    """Seeded sampling through the CLI: same seed same output, another seed another output,
    and --max-tokens / finish_reason."""
    folder = os.path.join(workdir, "mixtral_f32_mha")
    base = ["generate", "--model", folder, "--prompt-ids", "5,6,7", "--max-tokens", "24", "--ignore-eos",
            "--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--json"]
    outs = []
    for seed in ["7", "7", "8"]:
        rc, out, err = run_cli(cli, base + ["--seed", seed])
        if rc != 0:
            print("cli_sampling: failed: %s" % err.strip())
            return False
        outs.append(json.loads(out))
    ok = outs[0]["output_ids"] == outs[1]["output_ids"] and outs[0]["output_ids"] != outs[2]["output_ids"]
    ok = ok and len(outs[0]["output_ids"]) == 24 and outs[0]["finish_reason"] == "length"
    # EOS stops generation: make greedy's third token the model's EOS (a copy with another
    # eos_token_id), and the run ends there with finish_reason "stop" and the EOS in output_ids.
    greedy = ["generate", "--prompt-ids", "5,6,7", "--max-tokens", "8", "--json", "--logits"]
    rc, out, err = run_cli(cli, greedy + ["--model", folder, "--ignore-eos"])
    path = json.loads(out)["output_ids"] if rc == 0 else []
    stop_ok = False
    if len(path) == 8 and path[2] not in path[:2]:
        eos_folder = os.path.join(workdir, "eos_copy")
        shutil.rmtree(eos_folder, ignore_errors=True)
        shutil.copytree(folder, eos_folder)
        with open(os.path.join(eos_folder, "config.json")) as f:
            cfg = json.load(f)
        cfg["eos_token_id"] = path[2]
        with open(os.path.join(eos_folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        rc, out, err = run_cli(cli, greedy + ["--model", eos_folder])
        r = json.loads(out) if rc == 0 else {}
        stop_ok = (r.get("output_ids") == path[:3] and r.get("finish_reason") == "stop" and
                   len(r.get("logits", [])) == 4)
        # --ignore-eos keeps going past it.
        rc, out, err = run_cli(cli, greedy + ["--model", eos_folder, "--ignore-eos"])
        stop_ok = stop_ok and rc == 0 and json.loads(out)["output_ids"] == path
    else:
        print("cli_sampling: greedy path %s unsuitable for the EOS check" % path)
    ok = ok and stop_ok
    print("cli_sampling: %s (seed 7: %s..., seed 8: %s..., EOS stop %s)" %
          ("ok" if ok else "FAILED", outs[0]["output_ids"][:6], outs[2]["output_ids"][:6], "ok" if stop_ok else "FAILED"))
    return ok


def arg_parser(case_help):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", help="the moemesh binary (not needed with --write-only)")
    ap.add_argument("--write-only", action="store_true",
                    help="only write the cases' checkpoints into --workdir/<case> (for C++ tests)")
    ap.add_argument("--case", action="append", help=case_help)
    ap.add_argument("--workdir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true")
    return ap


def main():
    ap = arg_parser("a case name, cli_errors or cli_sampling (default: all)")
    a = ap.parse_args()
    names = a.case or list(CASES) + ["cli_errors", "cli_sampling"]
    if a.write_only:
        if not a.workdir:
            ap.error("--write-only needs --workdir")
        os.makedirs(a.workdir, exist_ok=True)
        for n in names:
            build_case(n, a.workdir, a.seed)
        return
    if not a.cli:
        ap.error("--cli is required")

    def check(n, workdir):
        if n in CASES:
            return check_case(a.cli, n, workdir, a.seed)
        if n in ("cli_errors", "cli_sampling"):
            if not os.path.isdir(os.path.join(workdir, "mixtral_f32_mha")):
                build_case("mixtral_f32_mha", workdir, a.seed)
            return check_cli_errors(a.cli, workdir) if n == "cli_errors" else check_cli_sampling(a.cli, workdir)
        print("unknown case %s" % n)
        return False

    run_checks(names, check, a.workdir, a.keep, "moemesh-ref-")


def run_self_test(self_test):
    """Runs a --self-test (NumPy only); exits 1 with its message when an assertion fails."""
    try:
        self_test()
    except AssertionError as e:
        print("self-test: FAILED: %s" % e)
        sys.exit(1)


def sibling_main(cases, errors_case, build_case, write_errors, check_case, check_errors, self_test, self_test_help):
    """main() of a reference script beside this one (gptq_reference, lora_reference): its model
    cases and one errors case, --write-only, --self-test, or the checks against --cli."""
    ap = arg_parser("a case name or %s (default: all)" % errors_case)
    ap.add_argument("--self-test", action="store_true", help=self_test_help)
    a = ap.parse_args()
    if a.self_test:
        return run_self_test(self_test)
    names = a.case or list(cases) + [errors_case]
    unknown = [n for n in names if n not in cases and n != errors_case]
    if unknown:
        ap.error("unknown case %s" % ", ".join(unknown))
    if a.write_only:
        if not a.workdir:
            ap.error("--write-only needs --workdir")
        os.makedirs(a.workdir, exist_ok=True)
        for n in names:
            if n == errors_case:
                write_errors(a.workdir, a.seed)
            else:
                build_case(n, a.workdir, a.seed)
        return
    if not a.cli:
        ap.error("--cli is required")

    def check(n, workdir):
        return check_errors(a.cli, workdir, a.seed) if n == errors_case else check_case(a.cli, n, workdir, a.seed)

    run_checks(names, check, a.workdir, a.keep, "moemesh-%s-" % errors_case.split("_")[0])


def run_checks(names, check, workdir, keep, prefix):
    """check(name, folder) for each name in workdir (a temporary one when None, removed after
    unless keep); exits 0 when every check passed."""
    folder = workdir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(folder, exist_ok=True)
    ok = True
    try:
        for n in names:
            ok &= check(n, folder)
    finally:
        if not keep and not workdir:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
