#!/usr/bin/env bash
# GPU check, on a machine with an NVIDIA GPU and the project's build dependencies:
# configure (Release, CUDA on), build the CUDA parts and the GPU tests, run `ctest -L gpu`, list
# the embedded device code, and print a benchmark table (kernel time against the memory
# roofline), then the whole medium model through Engine on the CPU and the CUDA backend
# (prefill and decode tokens/s at batch 1, 8, 32; batch 1's greedy tokens must match).
# Every step has a time limit; the whole run stays well under 8 minutes.
#
#   tests/gpu/run.sh LOG_DIR [--build-only]
#
# Logs in LOG_DIR: nvidia-smi.txt, configure.log, build.log, fatbin.txt, ctest.log, bench.md
# (both benchmarks' tables), bench_model.log (the model benchmark's progress), summary.txt.
# Exit status: 0 all passed on a GPU; 1 a step failed; 2 no GPU here (everything was built and
# the device-free checks passed, the kernel tests skipped). --build-only stops after the build
# and the device-free checks, and exits 0 when they pass (for machines without a GPU). Environment: BUILD_DIR (default <repo>/build-gpu), JOBS (default: all cores).
set -uo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 LOG_DIR [--build-only]" >&2
  exit 1
fi
LOG_DIR=$1
BUILD_ONLY=0
[[ "${2:-}" == "--build-only" ]] && BUILD_ONLY=1
mkdir -p "$LOG_DIR" && LOG_DIR=$(cd "$LOG_DIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build-gpu}
JOBS=${JOBS:-$(nproc)}
SUMMARY=$LOG_DIR/summary.txt
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
fail() {
  note "FAILED: $*"
  exit 1
}
# step NAME SECONDS LOG CMD...: runs CMD under a time limit, output to LOG.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  note "$name: exit $rc after $((SECONDS - t0)) s (log: $log)"
  [[ $rc -eq 124 ]] && note "$name: timed out after $limit s"
  return $rc
}

HAVE_GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi >"$LOG_DIR/nvidia-smi.txt" 2>&1; then
  HAVE_GPU=1
  note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
else
  note "gpu: none (nvidia-smi missing or failing)"
fi
[[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null || fail "no nvcc: the CUDA toolkit is needed to build"

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
step configure 120 "$LOG_DIR/configure.log" \
  cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON ||
  fail "configure (see configure.log)"
grep -q "moemesh: CUDA kernels ON" "$LOG_DIR/configure.log" || fail "configure did not enable CUDA (see configure.log)"

step build 300 "$LOG_DIR/build.log" \
  cmake --build "$BUILD" --parallel "$JOBS" --target moemesh_cuda test_gpu_kernels test_gpu_model test_gpu_experts test_compute_backend test_transport bench_gpu_kernels bench_gpu_model ||
  fail "build (see build.log)"

# Device code actually embedded: cuobjdump where the toolkit has it, our own reader otherwise.
LIB=$(find "$BUILD" -name libmoemesh_cuda.a -print -quit)
CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null || true)
{
  if [[ -n "$CUOBJDUMP" ]]; then
    "$CUOBJDUMP" --list-elf --list-ptx "$LIB"
    echo
  fi
  python3 "$ROOT/tests/gpu/list_fatbin.py" --require sm_90 --require compute_90 "$LIB"
} >"$LOG_DIR/fatbin.txt" 2>&1 || fail "sm_90 SASS / compute_90 PTX missing (see fatbin.txt)"
note "fatbin: $(tail -1 "$LOG_DIR/fatbin.txt")"

if [[ $BUILD_ONLY -eq 1 ]]; then
  step ctest-device-free 120 "$LOG_DIR/ctest.log" \
    ctest --test-dir "$BUILD" -L gpu -R "GpuProbe|GpuArgs|gpu_fatbin" --output-on-failure ||
    fail "device-free gpu tests (see ctest.log)"
  note "build-only: done"
  exit 0
fi

# -V: the log keeps every test's output, skip reasons included.
step ctest 240 "$LOG_DIR/ctest.log" ctest --test-dir "$BUILD" -L gpu -V --timeout 120
CTEST_RC=$?
note "ctest: $(grep -E 'tests passed|tests failed' "$LOG_DIR/ctest.log" | tail -1)"
SKIPPED=$(grep -c '(Skipped)' "$LOG_DIR/ctest.log" || true)
[[ $CTEST_RC -eq 0 ]] || fail "ctest -L gpu (see ctest.log)"

if [[ $HAVE_GPU -eq 0 ]]; then
  note "no GPU: $SKIPPED kernel tests skipped ($(grep -m1 -o 'no CUDA device: .*' "$LOG_DIR/ctest.log" || echo 'see ctest.log'))"
  exit 2
fi
# The NCCL pair tests need two devices; on a one-GPU host they skip, and only they may.
TWO_GPU_SKIPS=$(grep -c 'needs two devices (' "$LOG_DIR/ctest.log" || true)
[[ $TWO_GPU_SKIPS -gt 0 ]] && note "ctest: $TWO_GPU_SKIPS NCCL pair tests skipped: they need two GPUs"
[[ $((SKIPPED - TWO_GPU_SKIPS)) -le 0 ]] ||
  fail "a GPU is present but $((SKIPPED - TWO_GPU_SKIPS)) tests skipped (see ctest.log)"

BENCH=$(find "$BUILD" -name bench_gpu_kernels -type f -perm -u+x -print -quit)
step bench 120 "$LOG_DIR/bench.md" "$BENCH" || fail "benchmark (see bench.md)"
# The model benchmark's table is appended to bench.md; its progress lines go to bench_model.log.
BENCH_MODEL=$(find "$BUILD" -name bench_gpu_model -type f -perm -u+x -print -quit)
echo >>"$LOG_DIR/bench.md"
# shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
step bench-model 150 "$LOG_DIR/bench_model.log" \
  bash -c 'exec "$1" >>"$2"' _ "$BENCH_MODEL" "$LOG_DIR/bench.md" ||
  fail "model benchmark (see bench.md and bench_model.log)"
cat "$LOG_DIR/bench.md"
note "all passed"
exit 0
