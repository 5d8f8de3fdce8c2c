#!/usr/bin/env bash
# Copies the sources the GPU-only build (MOEMESH_GPU_ONLY) needs and a lent GPU machine lacks into
# DEST: DEST/googletest (GoogleTest's source, as Debian's googletest package ships it) and
# DEST/nlohmann-json/include (nlohmann-json's headers), each with its copyright file.
#
#   tests/gpu/third_party.sh DEST
#
# Environment: GTEST_SOURCE_DIR (default /usr/src/googletest/googletest), JSON_INCLUDE_DIR
# (default /usr/include: the folder that holds nlohmann/).
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 DEST" >&2
  exit 1
fi
dest=$1
gtest=${GTEST_SOURCE_DIR:-/usr/src/googletest/googletest}
json=${JSON_INCLUDE_DIR:-/usr/include}
[[ -f $gtest/CMakeLists.txt && -d $gtest/src ]] || {
  echo "$0: no GoogleTest source in $gtest (Debian: apt-get install googletest)" >&2
  exit 1
}
[[ -f $json/nlohmann/json.hpp ]] || {
  echo "$0: no nlohmann/json.hpp under $json (Debian: apt-get install nlohmann-json3-dev)" >&2
  exit 1
}

rm -rf "$dest/googletest" "$dest/nlohmann-json"
mkdir -p "$dest/googletest" "$dest/nlohmann-json/include"
# Only what its CMakeLists builds from: no docs, samples or its own tests.
cp -r "$gtest/CMakeLists.txt" "$gtest/cmake" "$gtest/include" "$gtest/src" "$dest/googletest/"
cp -r "$json/nlohmann" "$dest/nlohmann-json/include/"
for pkg in googletest:googletest nlohmann-json3-dev:nlohmann-json; do
  if [[ -f /usr/share/doc/${pkg%%:*}/copyright ]]; then
    cp "/usr/share/doc/${pkg%%:*}/copyright" "$dest/${pkg##*:}/COPYRIGHT"
  fi
done
