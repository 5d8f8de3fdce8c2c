#!/usr/bin/env bash
# Serving throughput and latency of a local cluster (`moemesh up`) under `moemesh bench`, with
# the baseline measured in the same run: the same requests one at a time (concurrency 1), then
# 16 in flight (closed loop), then open-loop Poisson arrivals. Prints each report and the
# throughput ratio against the baseline.
#   bench/serving_bench.sh [MODEL_DIR] [BUILD_DIR]   (default model: a medium Mixtral written here)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${2:-$root/build}
cli=$build/services/cli/moemesh
model=${1:-}
work=$(mktemp -d /tmp/moemesh-serving-bench.XXXXXX)
if [ -z "$model" ]; then
  model=$work/medium
  "$cli" mkmodel --arch mixtral --preset medium --dtype bf16 --seed 1 --out "$model" >/dev/null
fi
port=18431
"$cli" up --model "$model" --attention 1 --experts 2 --port $port --control-port 18432 --admin-port 18434 \
  --log-dir "$work/logs" >"$work/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  kill -0 $up 2>/dev/null || { cat "$work/up.log"; exit 1; }
  curl -sf -o /dev/null "http://127.0.0.1:18434/readyz" && break
  sleep 0.5
done
common=(--url "http://127.0.0.1:$port" --prompt-len uniform:16:128 --output-len 32 --seed 7)
echo "== baseline: one request at a time"
"$cli" bench "${common[@]}" --concurrency 1 --requests 8 --json "$work/c1.json"
echo "== 16 in flight"
"$cli" bench "${common[@]}" --concurrency 16 --requests 48 --json "$work/c16.json"
echo "== Poisson arrivals, 2 requests/s"
"$cli" bench "${common[@]}" --rate 2 --requests 32 --json "$work/poisson.json"
/usr/bin/python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
r = {k: json.load(open(f"{w}/{k}.json")) for k in ("c1", "c16", "poisson")}
def tput(x): return x["output_tokens_per_s"]
print(f"output tokens/s: baseline {tput(r['c1']):.1f}, 16 in flight {tput(r['c16']):.1f} "
      f"({tput(r['c16']) / tput(r['c1']):.2f}x the baseline), Poisson 2/s {tput(r['poisson']):.1f}")
PY
echo "(reports and logs in $work)"
