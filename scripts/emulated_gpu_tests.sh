#!/usr/bin/env bash
# emulated_gpu_tests.sh: runs the CUDA engine's GPU tests on a machine without a GPU, on the
# CPU emulation of the CUDA stack in tools/gpu_emulate (an emulated driver that runs the
# engine's own kernels/*.cu compiled for the CPU, and CPU stand-ins for cuBLASLt, cuBLAS and
# NCCL; kernels are still compiled by the real NVRTC, which must be installed:
# pip install nvidia-cuda-nvrtc). Two GPUs are emulated, so that the two-GPU tests run too.
#
# What this checks: everything the engine does around the GPU (buffer sizes and offsets,
# launch geometry, kernel arguments, the order of operations, which products and epilogues
# it asks cuBLASLt for, fused and plain attention, recomputation, decoding) against the CPU
# engine, with the same tests and tolerances as on a GPU; writes out of bounds and reads of
# memory nothing wrote are caught by the emulated driver, and each launch's blocks run in one
# of two orders, chosen per launch, so that a result depending on block order (which
# tests/cuda_engine.rs's determinism and resume tests would catch) shows here too. The NCCL process group's calls
# (in-place all-reduce, ZeRO-1's grouped reduces and broadcasts, overlapped buckets) run on
# 1 rank and on 2 ranks as threads and as processes, with buffers, counts and roots checked
# by the NCCL stand-in. What it cannot check: the real cuBLASLt's choices and limits, the
# GPU's own arithmetic (FMA contraction, tensor-core accumulation order), timing and memory
# on real hardware, NCCL's own transports and its asynchronous completion (an emulated
# collective returns when it is done, so a stalled peer blocks the call rather than leaving
# the stream pending). Those need scripts/gpu_check.sh on a GPU.
#
# Usage: scripts/emulated_gpu_tests.sh [extra cargo test arguments, e.g. -- test_name]
set -euo pipefail
cd "$(dirname "$0")/.."
emu=$(tools/gpu_emulate/build.sh "$PWD/target/gpu_emulate")
# The cuBLASLt and cuBLAS stand-ins against float64 first, then the NCCL stand-in.
g++ -std=c++17 -O2 -Wall -o "$emu/blas_check" tools/gpu_emulate/blas_check.cpp -ldl
"$emu/blas_check" "$emu" | tail -n 1
g++ -std=c++17 -O2 -Wall -pthread -o "$emu/nccl_check" tools/gpu_emulate/nccl_check.cpp -ldl
"$emu/nccl_check" "$emu" | tail -n 1
g++ -std=c++17 -O2 -Wall -pthread -o "$emu/graph_check" tools/gpu_emulate/graph_check.cpp -ldl
"$emu/graph_check" "$emu" 2>/dev/null | tail -n 1  # (stderr: the refusals it provokes)
export LD_LIBRARY_PATH="$emu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Every GPU test must run here: a skip is a failure.
export NANOGPT_REQUIRE_GPU=1
export XDG_CACHE_HOME="$PWD/target/gpu_emulate/cache"
export GPU_EMULATE_DEVICES=2
# (tests/nccl.rs and tests/zero.rs also hold tests that need no GPU; they run here as well.)
tests=(cuda_engine cuda_auto cuda_decode cuda_flash cuda_switches cuda_graphs cuda_epilogues cuda_recompute
       cuda_profile cuda_overlap nccl zero)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
cargo test --release "${args[@]}" "$@"
# Again with no bf16 algorithm in the emulated cuBLASLt: the bf16 engine's fp32 fallback for
# products cuBLASLt cannot run (bf16-only LayerNorm outputs widened first), against the CPU.
if [ $# -eq 0 ]; then
  GPU_EMULATE_LT_NO_BF16=1 cargo test --release --test cuda_engine -- bf16_training_tracks_the_cpu_engine
fi
