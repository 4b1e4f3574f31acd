#!/usr/bin/env bash
# Builds and runs the CPU emulation of the flash-attention kernels (see main.cpp).
# `run.sh quick` runs the shorter case list.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/flash_emulate
g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -Wno-unknown-pragmas -o "$out" "$here/main.cpp"
"$out" "$@"
