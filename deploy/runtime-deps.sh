#!/bin/sh
# Prints the packages that hold the shared libraries the given binaries load, one a line, so a
# Dockerfile's runtime stage installs exactly those (with the names of the builder's distro).
set -eu
for bin in "$@"; do ldd "$bin" >/dev/null; done  # fails on a missing or static binary
libs=$(for bin in "$@"; do ldd "$bin"; done | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)
owners=""
for lib in $libs; do
  real=$(readlink -f "$lib")
  owner=$(dpkg-query -S "$lib" 2>/dev/null || dpkg-query -S "$real" 2>/dev/null ||
          dpkg-query -S "/usr$lib" 2>/dev/null || dpkg-query -S "/usr$real" 2>/dev/null) ||
    { echo "runtime-deps: no package holds $lib" >&2; exit 1; }
  owners="$owners $(echo "$owner" | head -n1 | cut -d: -f1)"
done
printf '%s\n' $owners | sort -u
