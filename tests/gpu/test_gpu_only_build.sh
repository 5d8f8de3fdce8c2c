#!/usr/bin/env bash
# ctest gpu_only_build_without_debian_dev: the fallback build of a lent GPU machine
# (MOEMESH_GPU_ONLY, run-on-device.sh --build), here with the Debian -dev packages hidden from
# CMake (CMAKE_IGNORE_PREFIX_PATH=/usr: no find_package/find_library/find_path sees them), from
# the carried sources (tests/gpu/third_party.sh). Then checks that the compiler really used none of
# their headers (every header outside the tree, the carried sources and CUDA belongs to glibc,
# the kernel headers or GCC, by dpkg), that the programs load only glibc, GCC's runtime and CUDA,
# and that they run (the device tests skip).
#
#   tests/gpu/test_gpu_only_build.sh SOURCE_DIR WORK_DIR
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 SOURCE_DIR WORK_DIR" >&2
  exit 1
fi
SRC=$(cd "$1" && pwd)
WORK=$2
t0=$SECONDS
rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
PROGRAMS=(test_gpu_kernels test_gpu_model test_compute_backend bench_gpu_kernels bench_gpu_model)

bash "$SRC/tests/gpu/third_party.sh" "$WORK/third_party"
# With /usr ignored, CMake finds no compiler, ninja or ccache by itself: name them.
args=(-DCMAKE_IGNORE_PREFIX_PATH=/usr -DCMAKE_C_COMPILER="$(command -v gcc)"
      -DCMAKE_CXX_COMPILER="$(command -v g++)" -DCMAKE_MAKE_PROGRAM="$(command -v ninja)")
if command -v ccache >/dev/null; then  # reruns cost seconds, the first minutes
  args+=(-DCMAKE_CXX_COMPILER_LAUNCHER="$(command -v ccache)" -DCMAKE_CUDA_COMPILER_LAUNCHER="$(command -v ccache)")
  export CCACHE_BASEDIR=$WORK  # the carried sources' paths, relative: hits from any WORK_DIR
fi
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_GPU_ONLY=ON \
  -DMOEMESH_THIRD_PARTY_DIR="$WORK/third_party" "${args[@]}" >"$WORK/configure.log" 2>&1 ||
  { cat "$WORK/configure.log"; fail "configure"; }
grep -q "GPU-only build" "$WORK/configure.log" || fail "configure did not take the GPU-only path"
t1=$SECONDS
cmake --build "$WORK/build" --parallel "$(nproc)" --target "${PROGRAMS[@]}" >"$WORK/build.log" 2>&1 ||
  { tail -50 "$WORK/build.log"; fail "build"; }
echo "configure $((t1 - t0)) s, build $((SECONDS - t1)) s"

# Headers: outside the tree, the build, the carried sources and CUDA, only the C/C++ runtime's.
mapfile -t headers < <(ninja -C "$WORK/build" -t deps | awk '/^    \// {print $1}' |
  grep -v -e "^$SRC/" -e "^$WORK/" -e '^/usr/local/cuda' | xargs -r realpath | sort -u)
((${#headers[@]} > 0)) || fail "ninja -t deps listed no system headers (no dependency information?)"
if command -v dpkg >/dev/null; then
  others=$(dpkg -S "${headers[@]}" 2>&1 | sed 's/: .*//' | sed 's/, /\n/g' | sort -u |
    grep -Ev '^(libc6-dev|linux-libc-dev|libstdc\+\+-[0-9]+-dev|libgcc-[0-9]+-dev|gcc-[0-9]+|libcrypt-dev)(:[a-z0-9]+)?$' || true)
  [[ -z $others ]] || fail "headers from other packages were used: $others ($(dpkg -S "${headers[@]}" 2>&1 | grep -F "$(head -1 <<<"$others")" | head -3))"
  echo "headers: ${#headers[@]} from glibc, the kernel and GCC alone"
else
  echo "note: no dpkg here: the headers' packages are not checked"
fi

# Libraries: glibc, GCC's runtime and CUDA.
for p in "${PROGRAMS[@]}"; do
  stray=$(ldd "$WORK/build/$p" | awk '$2 == "=>" {print $1, $3}' |
    grep -Ev '^(libc|libm|libmvec|libpthread|libdl|librt|libstdc\+\+|libgcc_s)\.so| /usr/local/cuda' || true)
  [[ -z $stray ]] || fail "$p loads $stray"
done

# They run: the unit tests pass, the device tests skip, the benchmarks say there is no device.
for p in test_gpu_kernels test_gpu_model test_compute_backend; do
  "$WORK/build/$p" --gtest_brief=1 >"$WORK/$p.log" 2>&1 || { cat "$WORK/$p.log"; fail "$p"; }
done
grep -Eq '^\[  PASSED  \] [1-9]' "$WORK/test_compute_backend.log" || fail "test_compute_backend: no test passed"
echo "ok: the GPU-only build needs none of the Debian -dev packages; $((SECONDS - t0)) s"
