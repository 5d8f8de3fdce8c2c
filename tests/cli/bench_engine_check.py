"""Checks one `moemesh bench-engine --json` report against the checkpoint it measured.

The active bytes per token are recounted here from config.json and the safetensors headers
(tensor names and data_offsets), independently of the C++ count over the loaded weights.
"""
import json
import math
import os
import re
import struct
import sys


def safetensors_sizes(model_dir):
    """Tensor name -> byte size, from the headers of every safetensors file of the folder."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    files = [single] if os.path.exists(single) else sorted(set(json.load(open(index))["weight_map"].values()))
    sizes = {}
    for f in files:
        with open(os.path.join(model_dir, f), "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            sizes[name] = end - begin
    return sizes


def expected_parts(model_dir):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    sizes = safetensors_sizes(model_dir)
    k = cfg.get("num_experts_per_tok", 2)
    parts = {p: 0 for p in ("attention", "layer_norms", "router", "routed_experts", "shared_experts",
                            "dense_mlp", "final_norm", "lm_head", "embedding_row")}
    experts = {}  # layer -> (bytes of all experts, number of experts)
    for name, b in sizes.items():
        if re.fullmatch(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight", name):
            parts["attention"] += b
        elif re.fullmatch(r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", name):
            parts["layer_norms"] += b
        elif re.fullmatch(r"model\.layers\.\d+\.(block_sparse_moe|mlp)\.gate\.weight", name):
            parts["router"] += b
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.\w+\.weight", name):
            total, ids = experts.get(m[1], (0, set()))
            ids.add(m[3])
            experts[m[1]] = (total + b, ids)
        elif re.fullmatch(r"model\.layers\.\d+\.mlp\.shared_experts\.(gate|up|down)_proj\.weight", name):
            parts["shared_experts"] += b
        elif re.fullmatch(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", name):
            parts["dense_mlp"] += b
    for total, ids in experts.values():
        parts["routed_experts"] += total * k // len(ids)
    parts["final_norm"] = sizes["model.norm.weight"]
    embed = sizes["model.embed_tokens.weight"]
    parts["lm_head"] = sizes.get("lm_head.weight", embed)  # tied: the embedding is the lm_head
    parts["embedding_row"] = embed // cfg["vocab_size"]
    return cfg, parts


def main(report_path, model_dir):
    r = json.load(open(report_path))
    cfg, parts = expected_parts(model_dir)
    name = os.path.basename(os.path.normpath(model_dir))

    assert r["model"] == name, (r["model"], name)
    assert r["dtype"] == "bf16", r["dtype"]
    assert isinstance(r["threads"], int) and r["threads"] >= 1, r["threads"]
    assert r["bandwidth_bytes_per_s"] > 0, r["bandwidth_bytes_per_s"]

    assert r["active_bytes"] == parts, ("per-part active bytes differ", r["active_bytes"], parts)
    assert r["active_bytes_per_token"] == sum(parts.values()), (r["active_bytes_per_token"], sum(parts.values()))
    # The parts this architecture must have (and must not).
    assert parts["attention"] > 0 and parts["routed_experts"] > 0 and parts["lm_head"] > 0, parts
    if cfg["model_type"] == "deepseek":
        assert parts["shared_experts"] > 0 and parts["dense_mlp"] > 0, parts
    else:
        assert parts["shared_experts"] == 0 and parts["dense_mlp"] == 0, parts

    roofline = r["bandwidth_bytes_per_s"] / r["active_bytes_per_token"]
    assert math.isclose(r["roofline_tok_s"], roofline, rel_tol=1e-9), (r["roofline_tok_s"], roofline)

    assert [d["batch"] for d in r["decode"]] == [1, 2], r["decode"]
    for d in r["decode"]:
        assert d["tok_s"] > 0, d
    assert r["prefill"]["tokens"] == 16 and r["prefill"]["tok_s"] > 0, r["prefill"]
    ratio = r["decode"][0]["tok_s"] / r["roofline_tok_s"]
    assert math.isclose(r["decode_roofline_ratio"], ratio, rel_tol=1e-9), (r["decode_roofline_ratio"], ratio)
    print(f"ok {name}: {r['active_bytes_per_token']} active bytes/token, "
          f"{r['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s, ratio {r['decode_roofline_ratio']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
