#!/usr/bin/env bash
# Builds and runs the CPU emulation of the fp32 flash-attention kernels (see main.cpp).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/flash_emulate
g++ -std=c++20 -O2 -pthread -Wno-unknown-pragmas -o "$out" "$here/main.cpp"
"$out"
