#!/usr/bin/env bash
# Builds and runs the CPU emulation of the memory-bound kernels (see main.cpp).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/kernel_emulate
g++ -std=c++20 -O2 -ffp-contract=off -fno-strict-aliasing -pthread -Wall -Wno-unknown-pragmas -Wno-sign-compare \
    -o "$out" "$here/main.cpp"
# Every kernel runs under the three fiber schedules of tools/kernel_emulate/shim.h: warps
# nearly in step, then each warp as far ahead as its barriers allow (first warp first, then
# last warp first), so a missing __syncthreads between one warp's shared-memory write and
# another's access shows up as a wrong result.
for schedule in "" warps warps_reversed; do
    echo "schedule: ${schedule:-round robin}"
    EMU_SCHEDULE=$schedule "$out" "$@"
done
