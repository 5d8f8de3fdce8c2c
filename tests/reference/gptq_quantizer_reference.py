#!/usr/bin/python3
"""Independent NumPy GPTQ (issue #13) for the C++ quantizer's test (tests/unit/test_gptq_quantizer.cpp).

The algorithm of Frantar et al. 2022 written plainly, one column at a time, with no blocks and no
lazy updates (core/gptq_quantizer.cpp has both: they must not change the result):
  H = 2/n Xᵀ X in float64; columns with H_ii = 0 get H_ii = 1 and their weights zeroed;
  with desc_act the columns go in order of descending H_ii (a stable sort);
  H += damp · mean(diag H) · I;  U = chol(H⁻¹)ᵀ (upper), via numpy.linalg;
  for each column t: when a group starts (t % G == 0) its scale and zero come from the group's
  current weights (gptq_reference.rtn_params: the RTN convention, f16 scale rounded up);
  q = clip(round(w / s) + z, 0, 2^b - 1); the error (w - s (q - z)) / U_tt is fed back into
  every later column through row t of U;
  g_idx[perm[t]] = t // G.

Usage: gptq_quantizer_reference.py DIR   (every DIR/*/case.json; writes the result next to it)
       gptq_quantizer_reference.py --self-test
A case folder holds case.json {"out", "in", "rows", "bits", "group_size", "sym", "desc_act", "damp"},
w.f32 ([out, in] float32) and x.f32 ([rows, in] float32); the script writes q.i32 ([out, in]),
scales.f16 ([groups, out]), zeros.i32 ([groups, out]) and g_idx.i32 ([in]).
"""
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gptq_reference as gq  # noqa: E402
import hf_reference as hf  # noqa: E402


def gptq(W, X, bits, group_size, sym, desc_act, damp):
    """W [out, in], X [rows, in] (float64). Returns q [out, in], scales f16 [groups, out],
    zeros [groups, out], g_idx [in] and the dequantized W."""
    out, n = W.shape
    G = n if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    H = 2.0 / X.shape[0] * (X.T @ X)
    W = W.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if desc_act else np.arange(n)
    H = H[perm][:, perm]
    H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    U = np.linalg.cholesky(Linv.T @ Linv).T
    Wp = W[:, perm].T.copy()  # [n, out]: row t is column perm[t]
    ng = gq.n_groups(n, group_size)
    scales, zeros = np.zeros((ng, out), np.float16), np.zeros((ng, out), np.int64)
    Q = np.zeros((n, out), np.int64)
    for t in range(n):
        g = t // G
        if t % G == 0:
            scales[g], zeros[g] = gq.rtn_params(Wp[t:t + G], bits, sym)
        s, z = scales[g].astype(np.float64), zeros[g]
        w = Wp[t]
        Q[t] = np.clip(np.round(w / s) + z, 0, maxq)
        err = (w - s * (Q[t] - z)) / U[t, t]
        Wp[t + 1:] -= np.outer(U[t, t + 1:], err)
    q = np.empty((out, n), np.int64)
    q[:, perm] = Q.T
    g_idx = np.empty(n, np.int32)
    g_idx[perm] = np.arange(n) // G
    deq = scales.astype(np.float64)[g_idx].T * (q - zeros[g_idx].T)
    return q, scales, zeros, g_idx, deq


def rtn(W, bits, group_size, sym):
    """Round to nearest with the same convention (gptq_reference.pack_gptq), dequantized."""
    return gq.pack_gptq(W, bits, group_size, sym, False, None)["W"]


def solve_dir(folder):
    with open(os.path.join(folder, "case.json")) as f:
        c = json.load(f)
    W = np.fromfile(os.path.join(folder, "w.f32"), np.float32).reshape(c["out"], c["in"]).astype(np.float64)
    X = np.fromfile(os.path.join(folder, "x.f32"), np.float32).reshape(c["rows"], c["in"]).astype(np.float64)
    q, scales, zeros, g_idx, _ = gptq(W, X, c["bits"], c["group_size"], c["sym"], c["desc_act"], c["damp"])
    q.astype(np.int32).tofile(os.path.join(folder, "q.i32"))
    scales.tofile(os.path.join(folder, "scales.f16"))
    zeros.astype(np.int32).tofile(os.path.join(folder, "zeros.i32"))
    g_idx.tofile(os.path.join(folder, "g_idx.i32"))


def self_test():
    """The reference alone: on inputs with very uneven column scales GPTQ's output error is well
    below RTN's, desc_act's groups are sets of G columns, and dead columns come out as zero."""
    rng = np.random.default_rng(3)
    out, n, rows = 32, 96, 400
    X = rng.standard_normal((rows, 16)) @ rng.standard_normal((16, n)) + 0.1 * rng.standard_normal((rows, n))
    X *= np.exp(rng.normal(0, 1.5, n))
    X[:, 5] = 0.0
    W = rng.standard_normal((out, n))
    for bits, G, sym, desc in ((4, 32, True, False), (4, -1, False, True), (8, 32, False, True)):
        q, scales, zeros, g_idx, deq = gptq(W, X, bits, G, sym, desc, 0.01)
        e_gptq = np.sum((X @ (W - deq).T) ** 2)
        e_rtn = np.sum((X @ (W - rtn(W, bits, G, sym)).T) ** 2)
        what = "bits %d G %d sym %s desc_act %s" % (bits, G, sym, desc)
        if not e_gptq < 0.7 * e_rtn:
            raise AssertionError("%s: GPTQ error %.4g not below RTN's %.4g" % (what, e_gptq, e_rtn))
        counts = np.bincount(g_idx)
        size = n if G == -1 else G
        if not np.all(counts == size):
            raise AssertionError("%s: group sizes %s" % (what, counts))
        if not np.all(deq[:, 5] == 0):
            raise AssertionError("%s: dead column not zero" % what)
        print("self-test: %s: output error GPTQ %.4g vs RTN %.4g (%.2fx)" % (what, e_gptq, e_rtn, e_gptq / e_rtn))
    print("self-test: ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return hf.run_self_test(self_test)
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = sorted(glob.glob(os.path.join(sys.argv[1], "*", "case.json")))
    if not cases:
        sys.exit("no case.json under " + sys.argv[1])
    for c in cases:
        solve_dir(os.path.dirname(c))
    print("gptq_quantizer_reference: %d cases solved" % len(cases))


if __name__ == "__main__":
    main()
