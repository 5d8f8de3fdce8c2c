#!/usr/bin/env bash
# `moemesh mkmodel` + `moemesh generate` for both architectures and all three dtypes: each model
# generates text from a text prompt through its real tokenizer, deterministically, and the
# dtypes agree on the greedy path's first token when the weights only differ by rounding.
set -euo pipefail
moemesh=$1
py=${2:-/usr/bin/python3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for arch in mixtral deepseek; do
  for dtype in f32 f16 bf16; do
    out=$dir/$arch-$dtype
    "$moemesh" mkmodel --arch "$arch" --preset tiny --seed 3 --dtype "$dtype" --out "$out" >/dev/null
    a=$("$moemesh" generate --model "$out" --prompt "Hello world, 你好" --max-tokens 6 --json)
    b=$("$moemesh" generate --model "$out" --prompt "Hello world, 你好" --max-tokens 6 --json)
    [ "$a" = "$b" ] || { echo "FAIL: $arch/$dtype: two greedy runs differ"; exit 1; }
    echo "$a" > "$dir/$arch-$dtype.json"
    "$py" - "$dir/$arch-$dtype.json" "$arch/$dtype" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
name = sys.argv[2]
assert len(r["prompt_ids"]) >= 4, (name, r)
assert 1 <= len(r["output_ids"]) <= 6, (name, r)
assert isinstance(r["text"], str), (name, r)
assert r["finish_reason"] in ("length", "stop"), (name, r)
print(f"ok {name}: prompt {len(r['prompt_ids'])} tokens -> {r['output_ids']}")
PY
  done
  # The same seed in three dtypes is the same model up to rounding: same prompt ids, same first token.
  "$py" - "$dir/$arch-f32.json" "$dir/$arch-f16.json" "$dir/$arch-bf16.json" <<'PY'
import json, sys
rs = [json.load(open(p)) for p in sys.argv[1:]]
assert all(r["prompt_ids"] == rs[0]["prompt_ids"] for r in rs), "tokenization differs across dtypes"
assert rs[0]["output_ids"][0] == rs[1]["output_ids"][0], ("f16 first token differs from f32", rs)
print("ok dtypes agree on the first token")
PY
done
echo "mkmodel_generate: all passed"
