#!/usr/bin/env bash
# `moemesh bench-engine --json` on tiny Mixtral and DeepSeek models: the JSON has the shape a
# script reads, the bandwidth is positive, the roofline is bandwidth / active bytes, and the active
# bytes per token equal an independent count from config.json and the safetensors headers.
# Bad arguments exit non-zero with one line naming the fault.
set -euo pipefail
moemesh=$1
py=${2:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

for arch in mixtral deepseek; do
  out=$dir/$arch-tiny
  "$moemesh" mkmodel --arch "$arch" --preset tiny --dtype bf16 --out "$out" >/dev/null
  "$moemesh" bench-engine --model "$out" --json --batches 1,2 --prefill-tokens 16 --decode-tokens 4 \
    --repeats 1 >"$dir/$arch.json"
  "$py" "$here/bench_engine_check.py" "$dir/$arch.json" "$out"
done

# Each bad invocation: non-zero exit, nothing on stdout, one stderr line containing the fault.
expect_error() {
  local want=$1
  shift
  local rc=0
  "$moemesh" bench-engine "$@" >"$dir/out" 2>"$dir/err" || rc=$?
  if [ "$rc" -eq 0 ]; then echo "FAIL: bench-engine $* exited 0"; exit 1; fi
  if [ -s "$dir/out" ]; then echo "FAIL: bench-engine $* printed to stdout: $(cat "$dir/out")"; exit 1; fi
  if [ "$(wc -l <"$dir/err")" -ne 1 ]; then echo "FAIL: bench-engine $*: expected one error line, got:"; cat "$dir/err"; exit 1; fi
  if ! grep -qF -- "$want" "$dir/err"; then echo "FAIL: bench-engine $*: '$want' not in: $(cat "$dir/err")"; exit 1; fi
  echo "ok error: bench-engine $* -> $(cat "$dir/err")"
}
model=$dir/mixtral-tiny
expect_error '--batches: "0" is not a batch size' --model "$model" --batches 0 --json
expect_error '--batches: "x" is not a batch size' --model "$model" --batches 1,x
expect_error '--repeats must be >= 1' --model "$model" --repeats 0
expect_error '--threads must be >= 1' --model "$model" --threads 0
expect_error "$dir/no-such-model: no such checkpoint folder" --model "$dir/no-such-model" --json
expect_error '--prefill-tokens 40000 is more than' --model "$model" --prefill-tokens 40000
echo "bench_engine: all passed"
