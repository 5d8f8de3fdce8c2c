#!/usr/bin/env python3
"""expert_hosts_map_only_their_share: each expert host maps exactly the tensors of the experts the
coordinator assigned it (bytes computed here from the safetensors headers), less than the model's
routed-expert bytes; the attention worker maps every tensor except the routed experts.

Sources: the host's log line "serving N experts: L:E-E,..." and "mapped_weight_bytes=X
expected_bytes=Y", its /metrics gauge moemesh_expert_mapped_weight_bytes, and the attention
worker's log line "mapped X MiB (no routed experts)".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

MIB = 1 << 20


def check_cluster(args, tmp, cli, arch, replicas):
    model = cli.mkmodel(arch, os.path.join(tmp, f"{arch}-tiny"), seed=3)
    tensors = H.safetensors_tensors(model)
    per_expert = H.expert_bytes(tensors)
    total = sum(tensors.values())
    experts_total = sum(per_expert.values())
    H.check(experts_total > 0, f"{arch}: found no routed expert tensors in the checkpoint (names changed?)")
    tag = f"{arch}-r{replicas}"
    with H.Cluster(args, tmp, model, tag=tag) as c:
        c.up(attention=1, experts=4, replicas=replicas)
        held = {}
        for p in c.experts:
            m = p.wait_log(r"serving (\d+) experts: (\S+)")
            assigned = H.parse_expert_set(m.group(2))
            H.check(len(assigned) == int(m.group(1)), f"{p.name}: log says {m.group(1)} experts, lists {len(assigned)}")
            unknown = assigned - per_expert.keys()
            H.check(not unknown, f"{p.name}: assigned experts not in the checkpoint: {sorted(unknown)}")
            want = sum(per_expert[k] for k in assigned)
            m = p.wait_log(r"mapped_weight_bytes=(\d+) expected_bytes=(\d+)")
            mapped, expected = int(m.group(1)), int(m.group(2))
            gauge = p.metric("moemesh_expert_mapped_weight_bytes")
            H.log(f"{tag}: {p.name} serves {len(assigned)} experts: mapped {mapped} bytes, its own expectation "
                  f"{expected}, safetensors headers say {want}, /metrics {gauge}; all experts: {experts_total}")
            H.check(expected == want, f"{p.name}: expected_bytes={expected} but its experts' tensors take {want} bytes")
            H.check(mapped == want, f"{p.name}: mapped {mapped} bytes, its experts' tensors take {want} bytes")
            H.check(gauge is not None and int(gauge) == want,
                    f"{p.name}: /metrics moemesh_expert_mapped_weight_bytes={gauge}, expected {want}")
            H.check(mapped < experts_total, f"{p.name}: mapped {mapped} bytes, not less than all experts' {experts_total}")
            for k in assigned:
                held[k] = held.get(k, 0) + 1
        # Every expert is served, `replicas` times.
        counts = {held.get(k, 0) for k in per_expert}
        H.check(counts == {replicas}, f"{tag}: experts are held {sorted(counts)} times, expected {replicas} "
                                      f"(missing: {sorted(k for k in per_expert if k not in held)[:5]})")

        att = c.attention[0]
        m = att.wait_log(r"mapped ([0-9.]+) MiB \(no routed experts\)")
        reported = float(m.group(1))
        want = (total - experts_total) / MIB
        H.log(f"{tag}: attention maps {reported} MiB; model {total / MIB:.2f} MiB, of which routed experts "
              f"{experts_total / MIB:.2f} MiB -> expected {want:.2f} MiB")
        # The log rounds to 0.1 MiB.
        H.check(abs(reported - want) <= 0.05 + 1e-9,
                f"{att.name}: mapped {reported} MiB, expected {want:.3f} MiB (all tensors but the routed experts)")
        c.check_all_alive()


def test(args, tmp):
    cli = H.Cli(args.cli, dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    check_cluster(args, tmp, cli, "mixtral", 1)
    check_cluster(args, tmp, cli, "deepseek", 2)


if __name__ == "__main__":
    H.main(test)
