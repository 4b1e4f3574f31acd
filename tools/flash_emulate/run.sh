#!/usr/bin/env bash
# Builds and runs the CPU emulation of the flash-attention kernels (see main.cpp).
# `run.sh quick` runs the shorter case list.
#
# The cases run three times, under the schedules that expose the two ways a tile's
# cp.async copies can race (tools/flash_emulate/shim.h, tools/kernel_emulate/shim.h):
#   1. copies land when their issuer waits, warps advance nearly in step: a read before
#      the wait and the barrier after it sees stale bytes;
#   2. copies land when issued, each warp runs ahead to its next barrier (first warp
#      first), and 3. the same, last warp first: a copy into a tile another warp still
#      reads changes what that warp reads.
# The bit-for-bit checks (bf16 storage against fp32 storage, whose loads are synchronous;
# head size 64 against the generic kernels) then fail on any race.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${TMPDIR:-/tmp}/flash_emulate
g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -Wno-unknown-pragmas -o "$out" "$here/main.cpp"
echo "schedule 1/3: cp.async copies land at the wait, warps in step"
FLASH_EMU_CP_ASYNC=wait EMU_SCHEDULE= "$out" "$@"
echo "schedule 2/3: cp.async copies land at the issue, each warp ahead in turn, first warp first"
FLASH_EMU_CP_ASYNC=issue EMU_SCHEDULE=warps "$out" "$@"
echo "schedule 3/3: cp.async copies land at the issue, each warp ahead in turn, last warp first"
FLASH_EMU_CP_ASYNC=issue EMU_SCHEDULE=warps_reversed "$out" "$@"
