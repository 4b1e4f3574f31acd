#!/usr/bin/env bash
# Builds and runs the CPU emulation of the memory-bound kernels (see main.cpp).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/kernel_emulate
g++ -std=c++20 -O2 -ffp-contract=off -fno-strict-aliasing -pthread -Wall -Wno-unknown-pragmas -Wno-sign-compare \
    -o "$out" "$here/main.cpp"
"$out" "$@"
