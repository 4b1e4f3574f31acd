#!/usr/bin/env bash
# emulated_gpu_tests.sh: runs the CUDA engine's GPU tests on a machine without a GPU, on the
# CPU emulation of the CUDA stack in tools/gpu_emulate (an emulated driver that runs the
# engine's own kernels/*.cu compiled for the CPU, and CPU stand-ins for cuBLASLt and
# cuBLAS; kernels are still compiled by the real NVRTC, which must be installed:
# pip install nvidia-cuda-nvrtc).
#
# What this checks: everything the engine does around the GPU (buffer sizes and offsets,
# launch geometry, kernel arguments, the order of operations, which products and epilogues
# it asks cuBLASLt for, fused and plain attention, recomputation, decoding) against the CPU
# engine, with the same tests and tolerances as on a GPU; writes out of bounds and reads of
# memory nothing wrote are caught by the emulated driver. What it cannot check: the real
# cuBLASLt's choices and limits, the GPU's own arithmetic (FMA contraction, tensor-core
# accumulation order), timing and memory on real hardware, NCCL. Those need
# scripts/gpu_check.sh on a GPU.
#
# Usage: scripts/emulated_gpu_tests.sh [extra cargo test arguments, e.g. -- test_name]
set -euo pipefail
cd "$(dirname "$0")/.."
emu=$(tools/gpu_emulate/build.sh "$PWD/target/gpu_emulate")
# The cuBLASLt and cuBLAS stand-ins against float64 first.
g++ -std=c++17 -O2 -Wall -o "$emu/blas_check" tools/gpu_emulate/blas_check.cpp -ldl
"$emu/blas_check" "$emu" | tail -n 1
export LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Every GPU test must run here: a skip is a failure.
export NANOGPT_REQUIRE_GPU=1
export XDG_CACHE_HOME="$PWD/target/gpu_emulate/cache"
tests=(cuda_engine cuda_auto cuda_decode cuda_flash cuda_switches cuda_epilogues cuda_recompute
       cuda_profile)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo test --release "${args[@]}" "$@"
# Again with no bf16 algorithm in the emulated cuBLASLt: the bf16 engine's fp32 fallback for
# products cuBLASLt cannot run (bf16-only LayerNorm outputs widened first), against the CPU.
if [ $# -eq 0 ]; then
  GPU_EMULATE_LT_NO_BF16=1 cargo test --release --test cuda_engine -- bf16_training_tracks_the_cpu_engine
fi
