#!/usr/bin/env bash
# `moemesh plan search` writes Helm values that the chart renders without errors.
#   chart_plan_search.sh MOEMESH HELM CHART_DIR
set -euo pipefail
moemesh=$1 helm=$2 chart=$3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$moemesh" plan search --hardware h100 --slo ttft_p99=2s,itl_p99=100ms --traffic poisson:20 \
  --prompt-len 512 --output-len 128 --duration-s 20 --max-attention 4 --max-experts 4 \
  --budget-options 512 --model-path deepseek-moe-16b --values-out "$out/values.yaml" > "$out/search.txt"
grep -q "^cheapest: " "$out/search.txt" || { cat "$out/search.txt"; exit 1; }
grep -q "^  expertHosts: " "$out/values.yaml"
"$helm" lint --strict "$chart" -f "$out/values.yaml" > "$out/lint.txt" || { cat "$out/lint.txt"; exit 1; }
"$helm" template plan "$chart" -f "$out/values.yaml" > "$out/rendered.yaml"
# The shape chosen is the shape rendered: attention replicas and the router's expert-host count.
attention=$(sed -n "s/^  replicas: //p" "$out/values.yaml" | head -1)
grep -q -- "--expert-hosts" "$out/rendered.yaml"
echo "plan search -> helm template: ok ($(grep -c '^kind:' "$out/rendered.yaml") objects, attention replicas $attention)"
