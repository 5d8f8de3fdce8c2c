#!/usr/bin/env bash
# Packs the GPU tests and benchmarks for a lent GPU machine, which has CUDA but none of the Debian
# libraries we link (docs/gpu.md, "On a lent GPU machine"). Runs here, where nvcc and every
# dependency exist:
#   1. builds them in Release for sm_90 + compute_90 PTX (build-gpu-release/), unless --build-dir
#      names an existing CUDA build to take them from;
#   2. strips them, checks the kernels' sm_90 SASS and compute_90 PTX are in;
#   3. copies every shared library they load (ldd) that is neither glibc nor CUDA's (toolkit or
#      driver: the device brings its own), libstdc++ included (the device's may be older);
#   4. adds GoogleTest's and nlohmann-json's sources for the fallback build (run-on-device.sh
#      --build, MOEMESH_GPU_ONLY); the tests read no data files: they write their models;
#   5. writes OUT/moemesh-gpu.tar.xz (at most 40 MiB) and OUT/run-on-device.sh.
#
#   tests/gpu/bundle.sh [--build-dir DIR] [--out DIR]      (OUT default: <repo>/.gpu, git-ignored)
#
# Environment: JOBS (build parallelism, default all cores), LIMIT_MIB (default 40).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BUILD=""
OUT_DIR=$ROOT/.gpu
while (($#)); do
  case $1 in
    --build-dir) BUILD=$(cd "$2" && pwd); shift ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "usage: $0 [--build-dir DIR] [--out DIR]" >&2; exit 1 ;;
  esac
  shift
done
JOBS=${JOBS:-$(nproc)}
LIMIT_MIB=${LIMIT_MIB:-40}
# What run-on-device.sh runs; nccl_echo_peer exists only where NCCL was found.
PROGRAMS=(test_gpu_kernels test_gpu_model test_gpu_experts test_compute_backend test_transport
          bench_gpu_kernels bench_gpu_model)
OPTIONAL=(nccl_echo_peer)
# These link the kernels: their sm_90 SASS and compute_90 PTX must be in.
KERNEL_PROGRAMS=(test_gpu_kernels test_gpu_model bench_gpu_kernels bench_gpu_model)

if [[ -z $BUILD ]]; then
  BUILD=$ROOT/build-gpu-release
  launchers=()
  if command -v ccache >/dev/null; then
    launchers=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
  fi
  mkdir -p "$BUILD"
  log=$BUILD/configure.log
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEMESH_CUDA=ON "${launchers[@]}" >"$log" 2>&1 ||
    { cat "$log" >&2; exit 1; }
  grep -q "moemesh: CUDA kernels ON" "$log" || { echo "bundle: CUDA is off (no nvcc?): see $log" >&2; exit 1; }
  cmake --build "$BUILD" --parallel "$JOBS" --target "${PROGRAMS[@]}"
fi

find_program_in() {  # NAME: the built program, wherever the build put it
  find "$BUILD" -maxdepth 3 -name "$1" -type f -perm -u+x -print -quit
}
# glibc's libraries come with every Linux; CUDA's (toolkit and driver) must be the device's own.
is_system() {
  local name=$1 path=$2
  [[ $name =~ ^(libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil|libanl|libnsl)\.so ]] && return 0
  [[ $name =~ ^ld-linux ]] && return 0
  [[ $name =~ ^(libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvidia-|libnvrtc|libnvJitLink)\.so ]] && return 0
  [[ $path == /usr/local/cuda* ]] && return 0
  return 1
}

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
PKG=$STAGE/moemesh-gpu
mkdir -p "$PKG/bin" "$PKG/lib"

declare -A LIBS=()
for name in "${PROGRAMS[@]}" "${OPTIONAL[@]}"; do
  src=$(find_program_in "$name")
  if [[ -z $src ]]; then
    [[ " ${OPTIONAL[*]} " == *" $name "* ]] && continue
    echo "bundle: $name is not built in $BUILD" >&2
    exit 1
  fi
  strip --strip-unneeded -o "$PKG/bin/$name" "$src"
  # "name => path (address)"; the loader and the vDSO have no "=>".
  while read -r lib arrow path _; do
    [[ $arrow == "=>" ]] || continue
    if [[ $path == not ]]; then
      echo "bundle: $name needs $lib, which is not found here" >&2
      exit 1
    fi
    is_system "$lib" "$path" || LIBS[$lib]=$path
  done < <(ldd "$src")
done
for lib in "${!LIBS[@]}"; do
  cp -L "${LIBS[$lib]}" "$PKG/lib/$lib"
  strip --strip-unneeded "$PKG/lib/$lib"
done

kernel_bins=()
for name in "${KERNEL_PROGRAMS[@]}"; do kernel_bins+=("$PKG/bin/$name"); done
python3 "$ROOT/tests/gpu/list_fatbin.py" --require sm_90 --require compute_90 "${kernel_bins[@]}" >"$STAGE/fatbin.txt" ||
  { cat "$STAGE/fatbin.txt" >&2; echo "bundle: sm_90 SASS or compute_90 PTX missing" >&2; exit 1; }

bash "$ROOT/tests/gpu/third_party.sh" "$PKG/third_party"

{
  echo "moemesh GPU bundle"
  echo "made: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$BUILD/CMakeCache.txt")
  echo "build: $BUILD (${type:-RelWithDebInfo})"  # unset: CMakeLists.txt's default
  echo "nvcc: $(cat "$BUILD"/CMakeFiles/*/CMakeCUDACompiler.cmake | sed -n 's/^set(CMAKE_CUDA_COMPILER_VERSION "\(.*\)")/\1/p')"
  echo "programs: $(cd "$PKG/bin" && echo *)"
  echo "libraries: $(cd "$PKG/lib" && echo *)"
  echo "fatbin: $(tail -1 "$STAGE/fatbin.txt")"
} >"$PKG/MANIFEST.txt"

mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/moemesh-gpu.tar.xz" "$OUT_DIR/run-on-device.sh"
tar -C "$STAGE" -cf - moemesh-gpu | xz -T0 -6 >"$OUT_DIR/moemesh-gpu.tar.xz"
cp "$ROOT/tests/gpu/run-on-device.sh" "$OUT_DIR/run-on-device.sh"
size=$(stat -c %s "$OUT_DIR/moemesh-gpu.tar.xz")
cat "$PKG/MANIFEST.txt"
echo "bundle: $OUT_DIR/moemesh-gpu.tar.xz, $((size / 1024)) KiB (limit $LIMIT_MIB MiB)"
if ((size > LIMIT_MIB * 1024 * 1024)); then
  echo "bundle: over the $LIMIT_MIB MiB limit" >&2
  exit 1
fi
