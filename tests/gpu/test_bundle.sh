#!/usr/bin/env bash
# ctest gpu_bundle_loads_without_debian_libs: what a lent GPU machine would see of the bundle.
# Packs BUILD_DIR's GPU programs with tests/gpu/bundle.sh (the packing of the device run, from
# this build: no second CUDA build), copies the bundle into a fresh folder and runs
# run-on-device.sh --no-build there with every Debian library those programs load hidden from
# the loader (bound over with /dev/null in a mount namespace, where one can be made), and checks:
# the bundle is at most 40 MiB; every program loaded from the bundle, glibc or CUDA alone (libs.txt);
# the run said "no GPU" and exited 2.
#
#   tests/gpu/test_bundle.sh BUILD_DIR WORK_DIR
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 BUILD_DIR WORK_DIR" >&2
  exit 1
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(cd "$1" && pwd)
WORK=$2
t0=$SECONDS
rm -rf "$WORK"
mkdir -p "$WORK/device" "$WORK/out" "$WORK/toolbin" "$WORK/toollibs"
WORK=$(cd "$WORK" && pwd)
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

bash "$HERE/bundle.sh" --build-dir "$BUILD" --out "$WORK/device/.gpu"
size=$(stat -c %s "$WORK/device/.gpu/moemesh-gpu.tar.xz")
((size <= 40 * 1024 * 1024)) || fail "the bundle has $size bytes, over 40 MiB"

# The Debian libraries the build's own programs load: everything ldd resolves but glibc and CUDA.
programs=()
for p in test_gpu_kernels test_gpu_model test_gpu_experts test_compute_backend test_transport \
  nccl_echo_peer bench_gpu_kernels bench_gpu_model; do
  f=$(find "$BUILD" -maxdepth 3 -name "$p" -type f -perm -u+x -print -quit)
  [[ -n $f ]] && programs+=("$f")
done
declare -A hidden=()  # real path -> soname
while read -r soname path; do
  hidden[$(realpath "$path")]=$soname
done < <(for p in "${programs[@]}"; do ldd "$p"; done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' |
  grep -Ev '^(libc|libm|libmvec|libpthread|libdl|librt|libresolv)\.so|^ld-linux| /usr/local/cuda' | sort -u)
((${#hidden[@]} > 0)) || fail "found no Debian libraries to hide (ldd of ${programs[*]})"
echo "hiding ${#hidden[@]} libraries: ${hidden[*]}"

# The shell tools run-on-device.sh uses keep theirs (copies, through a wrapper that points
# LD_LIBRARY_PATH at them): only the programs lose them.
for path in "${!hidden[@]}"; do cp "$path" "$WORK/toollibs/${hidden[$path]}"; done
for tool in tar xz python3 grep sed awk sort stat cp find mktemp date cat tee timeout env nproc uname rm mkdir ldconfig; do
  path=$(command -v "$tool" || true)
  [[ -n $path && -f $path ]] || continue
  for lib in $(ldd "$path" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
    if [[ -n ${hidden[$(realpath "$lib")]:-} ]]; then
      printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$WORK/toollibs" "$path" >"$WORK/toolbin/$tool"
      chmod +x "$WORK/toolbin/$tool"
      break
    fi
  done
done

run_device() {
  cd "$WORK/device"
  env -i PATH="$WORK/toolbin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" HOME="$WORK" TMPDIR="$WORK" \
    OUT="$WORK/out" bash .gpu/run-on-device.sh --no-build
}
rc=0
if unshare -m true 2>/dev/null; then
  export -f run_device
  export WORK
  # shellcheck disable=SC2016 # expanded by the inner shell
  unshare -m bash -c '
    set -euo pipefail
    # mount needs some of them itself (libselinux: PCRE2).
    for lib in "${@:2}"; do LD_LIBRARY_PATH=$WORK/toollibs mount --bind /dev/null "$lib"; done
    # The hiding works: the build'"'"'s own program no longer loads.
    if "$1" --gtest_list_tests >/dev/null 2>&1; then echo "FAIL: $1 still loads with its libraries hidden" >&2; exit 99; fi
    run_device' _ "${programs[0]}" "${!hidden[@]}" || rc=$?
  ((rc != 99)) || exit 1
else
  echo "note: no mount namespace here (unshare -m): the libraries are not hidden, libs.txt is the check"
  run_device || rc=$?
fi

((rc == 2)) || fail "run-on-device.sh exited $rc, not 2 (no GPU)"
grep -q '^result: no GPU: every program loaded and ran' "$WORK/out/summary.txt" || fail "no 'no GPU' result in summary.txt"
! grep -q '^FAILED' "$WORK/out/summary.txt" || fail "a step failed (summary.txt)"
# Each bundled program was checked and ran.
bundled=$(tar -tJf "$WORK/device/.gpu/moemesh-gpu.tar.xz" | sed -n 's|^moemesh-gpu/bin/\(.\)|\1|p')
for p in $bundled; do
  grep -q "^== $p\$" "$WORK/out/libs.txt" || fail "$p missing from libs.txt"
  [[ $p == nccl_echo_peer ]] && continue  # run by test_transport's two-GPU test only
  grep -Eq "^(PASS|SKIP) ${p}[: ]" "$WORK/out/summary.txt" || fail "$p did not run (summary.txt)"
  # Without a device the benchmarks must say so, not pass.
  if [[ $p == bench_* ]]; then grep -q "^SKIP $p: no CUDA device" "$WORK/out/summary.txt" || fail "$p did not skip"; fi
done
# Every library came from the bundle, CUDA or glibc.
if grep -q 'not found' "$WORK/out/libs.txt"; then fail "unresolved libraries: $(grep 'not found' "$WORK/out/libs.txt" | sort -u | tr '\n' ' ')"; fi
stray=$(awk '$2 == "=>" {print $1, $3}' "$WORK/out/libs.txt" |
  grep -Ev ' /[^ ]*/moemesh-gpu/lib/| /usr/local/cuda|^(libc|libm|libmvec|libpthread|libdl|librt|libresolv)\.so' | sort -u || true)
[[ -z $stray ]] || fail "loaded from outside the bundle, CUDA and glibc: $stray"

# Finding CUDA's libraries there: a program that needs a library neither bundled nor known to the
# loader loads once a candidate folder ($CUDA_HOME/lib64 here) holds it, and without one the run
# names it and, with --no-build, fails.
mkdir -p "$WORK/fake/cuda/lib64" "$WORK/fake/stage" "$WORK/fake/dev/.gpu"
printf 'int moemesh_fake(void) { return 7; }\n' |
  gcc -shared -fPIC -Wl,-soname,libmoemeshfake.so.1 -o "$WORK/fake/cuda/lib64/libmoemeshfake.so.1" -x c -
tar -xJf "$WORK/device/.gpu/moemesh-gpu.tar.xz" -C "$WORK/fake/stage"
printf 'int moemesh_fake(void);\nint main(void) { return moemesh_fake() == 7 ? 0 : 1; }\n' |
  gcc -x c - -x none -o "$WORK/fake/stage/moemesh-gpu/bin/needs_cuda_lib" "$WORK/fake/cuda/lib64/libmoemeshfake.so.1"
tar -C "$WORK/fake/stage" -cJf "$WORK/fake/dev/.gpu/moemesh-gpu.tar.xz" moemesh-gpu
cp "$WORK/device/.gpu/run-on-device.sh" "$WORK/fake/dev/.gpu/"
fake_run() {  # OUT_DIR [VAR=VALUE...]
  (cd "$WORK/fake/dev" && env -i PATH="$PATH" HOME="$WORK" TMPDIR="$WORK" OUT="$1" "${@:2}" \
    bash .gpu/run-on-device.sh --no-build >"$1.log" 2>&1)
}
rc=0
fake_run "$WORK/fake/found" CUDA_HOME="$WORK/fake/cuda" || rc=$?
((rc == 2)) || { cat "$WORK/fake/found.log"; fail "with CUDA_HOME holding the library: exit $rc, not 2"; }
grep -q "libmoemeshfake.so.1 => $WORK/fake/cuda/lib64/" "$WORK/fake/found/libs.txt" ||
  fail "libmoemeshfake.so.1 not taken from \$CUDA_HOME/lib64 (libs.txt)"
rc=0
fake_run "$WORK/fake/lost" || rc=$?
((rc == 1)) || { cat "$WORK/fake/lost.log"; fail "with the library nowhere: exit $rc, not 1"; }
grep -q '^not found: libmoemeshfake.so.1 (needed by needs_cuda_lib)$' "$WORK/fake/lost/summary.txt" ||
  fail "the missing library is not named (summary.txt)"

echo "ok: bundle $((size / 1024)) KiB, $(echo "$bundled" | wc -w) programs load without the Debian libraries; $((SECONDS - t0)) s"
