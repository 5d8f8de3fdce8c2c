#!/usr/bin/env bash
# usage: checkpoint_cli.sh MOEMESH PYTHON CACHE_DIR
# Drives `moemesh mkmodel` and `moemesh inspect`; see tests.cmake.
set -euo pipefail
mm=$1 py=$2 cache=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# run_fails REGEX CMD...: CMD exits non-zero and prints exactly one stderr line matching REGEX.
run_fails() {
  local re=$1; shift
  local rc=0
  "$@" >"$work/out" 2>"$work/err" || rc=$?
  [ "$rc" -ne 0 ] || fail "succeeded: $*"
  [ "$(wc -l <"$work/err")" -eq 1 ] || fail "wanted one error line from '$*', got: $(cat "$work/err")"
  grep -Eq -- "$re" "$work/err" || fail "error of '$*' does not match /$re/: $(cat "$work/err")"
  echo "ok: $(cat "$work/err")"
}
broken() { run_fails "$2" "$mm" inspect --model "$1"; }
copy() { rm -rf "$work/$2"; cp -r "$work/$1" "$work/$2"; echo "$work/$2"; }
edit_json() {  # edit_json FILE PYTHON-STATEMENT-ON-j
  "$py" -c "import json,sys; p=sys.argv[1]; j=json.load(open(p)); $2; json.dump(j, open(p,'w'), indent=2)" "$1"
}

# A small tokenizer of our own (vocab 64) keeps the models tiny and the test independent of
# bootstrap; the real tokenizers are checked at the end when present.
tok=$work/tok
mkdir -p "$tok"
"$py" - "$tok" <<'PY'
import json, sys
d = sys.argv[1]
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
vocab.update({f"t{i}": i for i in range(3, 64)})
added = [{"id": i, "content": c, "special": True} for c, i in list(vocab.items())[:3]]
json.dump({"version": "1.0", "added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": []}},
          open(f"{d}/tokenizer.json", "w"))
json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, open(f"{d}/tokenizer_config.json", "w"))
PY

mk() { "$mm" mkmodel --tokenizer "$tok" "$@"; }

# --- writing ------------------------------------------------------------------------------
summary=$(mk --arch mixtral --preset tiny --seed 1 --dtype f32 --out "$work/mx")
echo "$summary"
[ "$(echo "$summary" | wc -l)" -eq 1 ] || fail "summary is not one line"
echo "$summary" | grep -Eq "params.*1 file" || fail "summary lacks params/files: $summary"
for f in config.json generation_config.json model.safetensors tokenizer.json tokenizer_config.json; do
  [ -f "$work/mx/$f" ] || fail "mkmodel did not write $f"
done
"$py" -c "
import json,sys; c=json.load(open(sys.argv[1]))
assert c['vocab_size']==64 and c['bos_token_id']==1 and c['eos_token_id']==2, c
assert c['architectures']==['MixtralForCausalLM'] and c['torch_dtype']=='float32', c
t=json.load(open(sys.argv[2])); assert '[INST]' in t['chat_template'], t
" "$work/mx/config.json" "$work/mx/tokenizer_config.json" || fail "config.json / tokenizer_config.json content"
"$mm" inspect --model "$work/mx" --check-values | grep -q '^ok$' || fail "inspect of a fresh model"

# Deterministic: same seed, same bytes; another seed, other weights.
mk --arch mixtral --preset tiny --seed 1 --dtype f32 --out "$work/mx2" >/dev/null
for f in config.json generation_config.json model.safetensors tokenizer_config.json; do
  cmp -s "$work/mx/$f" "$work/mx2/$f" || fail "$f differs between two runs with the same seed"
done
mk --arch mixtral --preset tiny --seed 2 --dtype f32 --out "$work/mx3" >/dev/null
cmp -s "$work/mx/model.safetensors" "$work/mx3/model.safetensors" && fail "seeds 1 and 2 wrote the same weights"
cmp -s "$work/mx/config.json" "$work/mx3/config.json" || fail "config.json depends on the seed"

# Sharded DeepSeek model, twice: same shards, a valid index.
mk --arch deepseek --preset tiny --seed 3 --shard-size 100KB --out "$work/ds" | grep -q shards || fail "no shards"
mk --arch deepseek --preset tiny --seed 3 --shard-size 100KB --out "$work/ds2" >/dev/null
nshards=$(ls "$work/ds" | grep -c '^model-.*-of-.*\.safetensors$')
[ "$nshards" -gt 2 ] || fail "expected several shards, got $nshards"
[ -f "$work/ds/model.safetensors.index.json" ] && [ ! -f "$work/ds/model.safetensors" ] || fail "sharded layout"
for f in "$work"/ds/model-*.safetensors "$work/ds/model.safetensors.index.json"; do
  cmp -s "$f" "$work/ds2/$(basename "$f")" || fail "$(basename "$f") differs between runs"
done
"$mm" inspect --model "$work/ds" | grep -q "(1 MoE)" || fail "deepseek tiny: layer 0 dense, layer 1 MoE"
mk --arch mixtral --preset tiny --sliding-window 16 --out "$work/sw" >/dev/null
grep -q '"sliding_window": 16' "$work/sw/config.json" || fail "--sliding-window"

# --- damaged checkpoints ------------------------------------------------------------------
d=$(copy mx truncated)
truncate -s -100 "$d/model.safetensors"
broken "$d" '^moemesh: error: model\.safetensors: tensor .* beyond the end of the file.*truncated'

d=$(copy mx flipped)
printf 'X' | dd of="$d/model.safetensors" bs=1 seek=8 conv=notrunc status=none
broken "$d" '^moemesh: error: model\.safetensors: header is not a JSON object'

d=$(copy mx badlen)
printf '\xff' | dd of="$d/model.safetensors" bs=1 seek=5 conv=notrunc status=none
broken "$d" '^moemesh: error: model\.safetensors: bad header length'

d=$(copy mx reshaped)
edit_json "$d/config.json" "j['intermediate_size']=256"
broken "$d" '^moemesh: error: model\.safetensors: tensor model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight has shape \[128,64\], expected \[256,64\]'

d=$(copy mx toomanyk)
edit_json "$d/config.json" "j['num_experts_per_tok']=9"
broken "$d" '^moemesh: error: config\.json: field "num_experts_per_tok" \(9\) exceeds num_local_experts \(8\)$'

d=$(copy mx badjson)
echo '{"model_type": ' >"$d/config.json"
broken "$d" '^moemesh: error: config\.json: not valid JSON'

d=$(copy mx noconfig)
rm "$d/config.json"
broken "$d" 'no config\.json'

d=$(copy mx noweights)
rm "$d/model.safetensors"
broken "$d" 'no model\.safetensors or model\.safetensors\.index\.json$'

d=$(copy ds noshard)
rm "$d/model-00002-of-0000$nshards.safetensors"
broken "$d" "^moemesh: error: model-00002-of-0000$nshards\\.safetensors: not found \\(listed in model\\.safetensors\\.index\\.json\\)$"

d=$(copy ds unlisted)
edit_json "$d/model.safetensors.index.json" "del j['weight_map']['model.layers.1.mlp.experts.5.up_proj.weight']"
broken "$d" '^moemesh: error: model\.safetensors\.index\.json: tensor model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight is missing from weight_map$'

d=$(copy ds truncshard)
last=$(ls "$d"/model-*.safetensors | tail -1)
truncate -s -2 "$last"
broken "$d" "^moemesh: error: $(basename "$last" | sed 's/\./\\./g'): tensor .* truncated"

broken "$work/absent" 'no such checkpoint folder'

# A NaN in the weights passes the header checks but not --check-values.
d=$(copy mx nan)
size=$(stat -c %s "$d/model.safetensors")
printf '\x00\x00\xc0\x7f' | dd of="$d/model.safetensors" bs=1 seek=$((size - 4)) conv=notrunc status=none
"$mm" inspect --model "$d" >/dev/null || fail "a NaN should not fail the structural checks"
run_fails 'non-finite value' "$mm" inspect --model "$d" --check-values

# --- bad mkmodel flags ----------------------------------------------------------------------
run_fails 'unknown architecture "llama"' "$mm" mkmodel --arch llama --out "$work/x" --tokenizer "$tok"
run_fails 'unknown preset "huge"' "$mm" mkmodel --arch mixtral --preset huge --out "$work/x" --tokenizer "$tok"
run_fails 'unsupported float dtype "f8"' "$mm" mkmodel --arch mixtral --dtype f8 --out "$work/x" --tokenizer "$tok"
run_fails 'not found' "$mm" mkmodel --arch mixtral --out "$work/x" --tokenizer "$work/no-such-tokenizer"
run_fails '--shard-size' "$mm" mkmodel --arch mixtral --out "$work/x" --tokenizer "$tok" --shard-size lots
run_fails '--sliding-window applies to mixtral' "$mm" mkmodel --arch deepseek --sliding-window 8 --out "$work/x" --tokenizer "$tok"

# --- bootstrap's tokenizers (the defaults) ----------------------------------------------------
if [ -f "$cache/tokenizer-llama2/models/tokenizer.json" ] && [ -f "$cache/tokenizer-deepseek_v3/models/tokenizer.json" ]; then
  MOEMESH_CACHE=$cache "$mm" mkmodel --arch mixtral --out "$work/dflt-mx" >/dev/null
  MOEMESH_CACHE=$cache "$mm" mkmodel --arch deepseek --out "$work/dflt-ds" >/dev/null
  "$py" -c "
import json,sys
m=json.load(open(sys.argv[1]+'/config.json')); d=json.load(open(sys.argv[2]+'/config.json'))
assert (m['vocab_size'], m['bos_token_id'], m['eos_token_id']) == (32000, 1, 2), m
assert (d['vocab_size'], d['bos_token_id'], d['eos_token_id']) == (128815, 0, 1), d
assert m['torch_dtype'] == 'bfloat16' and d['architectures'] == ['DeepseekForCausalLM']
" "$work/dflt-mx" "$work/dflt-ds" || fail "default tokenizers"
  "$mm" inspect --model "$work/dflt-ds" >/dev/null || fail "inspect default deepseek"
else
  echo "skip: bootstrap tokenizers not in $cache"
fi
echo "checkpoint_cli: all passed"
