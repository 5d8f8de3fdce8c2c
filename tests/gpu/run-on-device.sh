#!/usr/bin/env bash
# The GPU check on a lent GPU machine (docs/gpu.md, "On a lent GPU machine"), run from the root of
# the carried repo with the bundle that tests/gpu/bundle.sh wrote to .gpu/:
#
#   bash .gpu/run-on-device.sh [--build | --no-build]
#
# Unpacks the bundle to a temporary folder, finds the device's cuBLAS, cuBLASLt, NCCL and cudart
# (the CUDA toolkit's lib folders, else the nvidia-* Python packages'), checks that every program
# loads (ldd), then runs the GPU unit tests, the model-vs-CPU tests and both benchmarks, each under
# a time limit, all within MOEMESH_GPU_TOTAL_S (default 330 s) after the build, if any, and within
# MOEMESH_GPU_CAP_S (default 560 s) of the start: inside a 600 s device call.
# If a program cannot load (a library missing there), it builds the same tests there instead
# (MOEMESH_GPU_ONLY: CUDA, CMake, ninja and a compiler alone, from this tree and the bundle's
# GoogleTest and nlohmann-json sources); --build always does, --no-build never does.
#
# Logs under $OUT (default ./gpu-out): summary.txt (pass/fail per program, the benchmark tables,
# the GPU's name and driver), env.txt (nvidia-smi, library folders), libs.txt (what each program
# loads), tests.log, bench.md, bench_model.log, build.log (when built there).
# Exit status: 0 all passed on a GPU; 1 something failed; 2 no GPU (every program loaded and ran,
# the device tests skipped).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$PWD
MODE=auto
case ${1:-} in
  --build) MODE=build ;;
  --no-build) MODE=bundle ;;
  "") ;;
  *) echo "usage: $0 [--build | --no-build]" >&2; exit 1 ;;
esac
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUNDLE=${MOEMESH_GPU_BUNDLE:-$HERE/moemesh-gpu.tar.xz}
TOTAL_S=${MOEMESH_GPU_TOTAL_S:-330}
CAP_S=${MOEMESH_GPU_CAP_S:-560}
BUILD_S=${MOEMESH_GPU_BUILD_S:-240}  # the fallback build's limit (about 1 minute on 16 cores)
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
: >"$OUT/tests.log"
: >"$OUT/bench.md"
FAILED=0
# Unit tests, model-vs-CPU tests, then the benchmarks, with their own time limits (seconds).
TESTS=(test_gpu_kernels:120 test_gpu_model:120 test_gpu_experts:90 test_compute_backend:60 test_transport:90)

note() { echo "$*" | tee -a "$SUMMARY"; }
failed() {
  note "FAILED: $*"
  FAILED=1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/moemesh-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DEADLINE=$((SECONDS + TOTAL_S))
# limit SECONDS: SECONDS capped by what is left of the run's time.
limit() {
  local left=$((DEADLINE - SECONDS))
  ((left < $1)) && echo "$left" || echo "$1"
}

# --- the GPU ---------------------------------------------------------------------------------
HAVE_GPU=0
{
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null && nvidia-smi; then HAVE_GPU=1; fi
} >"$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt"
if ((HAVE_GPU)); then
  note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
else
  note "gpu: none (nvidia-smi missing or failing)"
fi
note "host: $(nproc) cores, $(uname -r)"

# --- unpack --------------------------------------------------------------------------------------
PKG=""
if [[ -f $BUNDLE ]]; then
  if command -v xz >/dev/null; then
    tar -xJf "$BUNDLE" -C "$WORK"
  else  # no xz there: Python's lzma reads it too
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$BUNDLE" "$WORK"
  fi
  PKG=$WORK/moemesh-gpu
  note "bundle: $(sed -n 's/^commit: //p' "$PKG/MANIFEST.txt"), $(sed -n 's/^build: .*(\(.*\))$/\1/p' "$PKG/MANIFEST.txt") build"
elif [[ $MODE == bundle ]]; then
  failed "no bundle at $BUNDLE (make one with tests/gpu/bundle.sh)"
  exit 1
fi

# --- libraries -----------------------------------------------------------------------------------
# Where CUDA's libraries may be: the toolkit's folders, the driver's mount, and the lib/ folders of
# the nvidia-* Python packages (nvidia/cublas/lib, nvidia/cu13/lib, ...).
candidate_dirs() {
  local d
  for d in ${CUDA_HOME:+$CUDA_HOME/lib64} /usr/local/cuda/lib64 /usr/local/cuda/lib \
    /usr/local/cuda/targets/*/lib /usr/local/cuda-*/lib64 /usr/local/cuda-*/targets/*/lib \
    /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [[ -d $d ]] && echo "$d"
  done
  if command -v python3 >/dev/null; then
    python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.add(d)
            print(d)
EOF
  fi
}
LDD=(ldd)
command -v ldd >/dev/null || LDD=(/lib64/ld-linux-x86-64.so.2 --list)
LIB_PATH=""  # ours, ahead of the LD_LIBRARY_PATH we were given (the driver's folder may be in that)
AMBIENT=${LD_LIBRARY_PATH:-}
ld_path() { echo "$LIB_PATH${AMBIENT:+${LIB_PATH:+:}$AMBIENT}"; }
# check BIN_DIR: ldd of each program with ld_path. Prints "missing SONAME PROGRAM" for each library
# not found (a candidate folder may hold it) and "broken PROGRAM: WHY" for anything else that stops
# it loading (an unreadable or foreign file, a symbol version the library lacks).
BROKEN='version .* not found|error while loading|file too short|wrong ELF class|not a dynamic executable'
check() {
  local b out rc
  for b in "$1"/*; do
    rc=0
    out=$(LD_LIBRARY_PATH=$(ld_path) "${LDD[@]}" "$b" 2>&1) || rc=$?
    awk -v p="${b##*/}" -v broken="$BROKEN" '
      /=> not found/ {print "missing", $1, p; next}
      $0 ~ broken {sub(/^[ \t]+/, ""); print "broken", p ": " $0}' <<<"$out"
    if ((rc != 0)) && ! grep -qE "=> not found|$BROKEN" <<<"$out"; then echo "broken ${b##*/}: ldd exit $rc"; fi
  done | sort -u
}
# resolve BIN_DIR: adds the first candidate folder holding each missing library; 0 when all load.
resolve() {
  local bin=$1 lib d
  local -a dirs
  mapfile -t dirs < <(candidate_dirs)
  {
    echo "== library folders searched"
    printf '%s\n' "${dirs[@]}"
  } >>"$OUT/env.txt"
  for lib in $(check "$bin" | awk '$1 == "missing" {print $2}' | sort -u); do
    for d in "${dirs[@]}"; do
      if [[ -e $d/$lib ]]; then
        [[ ":$LIB_PATH:" == *":$d:"* ]] || LIB_PATH=$LIB_PATH:$d
        break
      fi
    done
  done
  # cudart loads the driver's libcuda.so.1 at run time (no NEEDED entry: ldd cannot tell); where
  # the loader's cache lacks it, the first candidate folder that has it.
  local cache
  cache=$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)
  if [[ $cache != *"libcuda.so.1 "* ]]; then
    for d in "${dirs[@]}"; do
      if [[ -e $d/libcuda.so.1 ]]; then
        [[ ":$LIB_PATH:" == *":$d:"* ]] || LIB_PATH=$LIB_PATH:$d
        break
      fi
    done
  fi
  LIB_PATH=${LIB_PATH#:}
  echo "== LD_LIBRARY_PATH=$(ld_path)" >>"$OUT/env.txt"
  local b
  for b in "$bin"/*; do
    echo "== ${b##*/}"
    LD_LIBRARY_PATH=$(ld_path) "${LDD[@]}" "$b" 2>&1 || true
  done >"$OUT/libs.txt"
  local left kind a b
  left=$(check "$bin")
  [[ -z $left ]] && return 0
  while read -r kind a b; do
    if [[ $kind == missing ]]; then note "not found: $a (needed by $b)"; else note "cannot load $a $b"; fi
  done <<<"$left"
  return 1
}

BIN=""
if [[ $MODE != build ]] && [[ -n $PKG ]]; then
  LIB_PATH=$PKG/lib
  if resolve "$PKG/bin"; then
    BIN=$PKG/bin
    note "bundle: every program loads (libs.txt); LD_LIBRARY_PATH=$(ld_path)"
  elif [[ $MODE == bundle ]]; then
    failed "bundled programs cannot load (libs.txt) and --no-build was given"
    exit 1
  else
    note "bundle: some programs cannot load: building them here instead"
  fi
fi

# --- the fallback: build here with CUDA, CMake, ninja and a compiler alone ----------------------
if [[ -z $BIN ]]; then
  third_party=${MOEMESH_THIRD_PARTY_DIR:-${PKG:+$PKG/third_party}}
  [[ -f $ROOT/tests/gpu/gpu_only.cmake ]] || { failed "run this from the repo's root ($ROOT has no tests/gpu)"; exit 1; }
  [[ -n $third_party ]] || { failed "no bundle, so no GoogleTest/nlohmann-json sources to build with"; exit 1; }
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  t0=$SECONDS
  rc=0
  {
    timeout -k 10 90 cmake -S "$ROOT" -B "$WORK/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DMOEMESH_GPU_ONLY=ON -DMOEMESH_THIRD_PARTY_DIR="$third_party" &&
      timeout -k 10 "$BUILD_S" cmake --build "$WORK/build" --parallel "$(nproc)" --target \
        test_gpu_kernels test_gpu_model test_compute_backend bench_gpu_kernels bench_gpu_model
  } >"$OUT/build.log" 2>&1 || rc=$?
  note "build (GPU-only, here): exit $rc after $((SECONDS - t0)) s (build.log)"
  ((rc == 0)) || { failed "the GPU-only build (see build.log)"; tail -30 "$OUT/build.log"; exit 1; }
  mkdir -p "$WORK/bin"
  for p in test_gpu_kernels test_gpu_model test_compute_backend bench_gpu_kernels bench_gpu_model; do
    cp "$WORK/build/$p" "$WORK/bin/"
  done
  BIN=$WORK/bin
  LIB_PATH=""
  resolve "$BIN" || { failed "the programs built here cannot load (libs.txt)"; exit 1; }
  note "GPU-only build: test_gpu_experts and test_transport need the actors layer and are left out"
  # The run's own time starts after the build, but all ends within CAP_S.
  DEADLINE=$((SECONDS + TOTAL_S < CAP_S ? SECONDS + TOTAL_S : CAP_S))
fi
# Only the programs get LD_LIBRARY_PATH: the bundled libstdc++ is theirs, not the tools' here.
RUN=(env "LD_LIBRARY_PATH=$(ld_path)")
if [[ -x $BIN/nccl_echo_peer ]]; then RUN+=("MOEMESH_NCCL_ECHO_PEER=$BIN/nccl_echo_peer"); fi

# --- tests ---------------------------------------------------------------------------------------
SKIPPED_TOTAL=0
for entry in "${TESTS[@]}"; do
  prog=${entry%%:*}
  [[ -x $BIN/$prog ]] || continue
  lim=$(limit "${entry##*:}")
  if ((lim < 5)); then
    failed "$prog: not run, out of time (MOEMESH_GPU_TOTAL_S=$TOTAL_S)"
    continue
  fi
  log=$WORK/$prog.log
  t0=$SECONDS
  rc=0
  timeout -k 10 "$lim" "${RUN[@]}" "$BIN/$prog" --gtest_color=no >"$log" 2>&1 || rc=$?
  { echo "===== $prog (exit $rc)"; cat "$log"; } >>"$OUT/tests.log"
  passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
  skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*/\1/p' "$log" | tail -1)
  # One GPU: the NCCL pair tests need two and may skip; on a GPU nothing else may.
  two_gpu=$(grep -c 'needs two devices (' "$log" || true)
  SKIPPED_TOTAL=$((SKIPPED_TOTAL + ${skipped:-0}))
  what="$prog: ${passed:-0} passed, ${skipped:-0} skipped in $((SECONDS - t0)) s"
  if ((rc == 124 || rc == 137)); then
    failed "$what: timed out after $lim s"
  elif ((rc != 0)); then
    names=$(sed -n 's/^\[  FAILED  \] \([^ ]*\.[^ ]*\).*/\1/p' "$log" | sort -u | tr '\n' ' ')
    failed "$what, exit $rc: ${names:-$(tail -1 "$log")}"
  elif ((HAVE_GPU && ${skipped:-0} > two_gpu)); then
    failed "$what: skipped with a GPU present ($(grep -m1 -o 'no CUDA device: .*' "$log" || echo 'see tests.log'))"
  elif ((two_gpu)); then
    note "PASS $what ($two_gpu need two GPUs)"
  else
    note "PASS $what"
  fi
done

# --- benchmarks ----------------------------------------------------------------------------------
# bench NAME LIMIT CMD...: its table is appended to bench.md.
bench() {
  local name=$1 lim
  lim=$(limit "$2")
  shift 2
  if ((lim < 5)); then
    failed "$name: not run, out of time (MOEMESH_GPU_TOTAL_S=$TOTAL_S)"
    return
  fi
  local t0=$SECONDS rc=0 out=$WORK/$name.out
  timeout -k 10 "$lim" "$@" >"$out" || rc=$?
  { echo "## $name"; cat "$out"; echo; } >>"$OUT/bench.md"
  if ((rc == 124 || rc == 137)); then
    failed "$name: timed out after $lim s"
  elif ((!HAVE_GPU)) && ((rc == 0 || rc == 2)) && grep -qs 'no CUDA device' "$out" "$OUT/bench_model.log"; then
    note "SKIP $name: no CUDA device (it loaded and said so) in $((SECONDS - t0)) s"
  elif ((rc != 0)); then
    failed "$name: exit $rc after $((SECONDS - t0)) s (bench.md)"
  else
    note "PASS $name in $((SECONDS - t0)) s"
  fi
}
if [[ -x $BIN/bench_gpu_kernels ]]; then bench bench_gpu_kernels 120 "${RUN[@]}" "$BIN/bench_gpu_kernels"; fi
# The model benchmark's progress lines (stderr) go to bench_model.log.
# shellcheck disable=SC2016 # $1 and $@ are the inner shell's arguments
if [[ -x $BIN/bench_gpu_model ]]; then
  bench bench_gpu_model 150 bash -c 'exec "${@:2}" 2>"$1"' _ "$OUT/bench_model.log" "${RUN[@]}" "$BIN/bench_gpu_model"
fi

# --- result --------------------------------------------------------------------------------------
{
  echo
  echo "== benchmarks (bench.md)"
  cat "$OUT/bench.md"
} | tee -a "$SUMMARY"
if ((FAILED)); then
  note "result: FAILED (see above; logs in $OUT)"
  exit 1
fi
if ((!HAVE_GPU)); then
  note "result: no GPU: every program loaded and ran, $SKIPPED_TOTAL device tests skipped"
  exit 2
fi
note "result: all passed on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
