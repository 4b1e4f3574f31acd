#!/usr/bin/env bash
# Builds the CPU emulation of the CUDA stack (libcuda.so.1, libcublasLt.so.13,
# libcublas.so.13, libnccl.so.2; see driver.cpp and nccl.cpp) into the directory given as the
# first argument (default $TMPDIR/gpu_emulate). Put that directory first on LD_LIBRARY_PATH,
# with a real NVRTC (pip install nvidia-cuda-nvrtc) findable, and the CUDA engine runs on the
# CPU.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${TMPDIR:-/tmp}/gpu_emulate}
mkdir -p "$out"
# Hidden visibility: the libraries export their API only (driver.cpp, cublas*.cpp, nccl.cpp).
flags=(-std=c++20 -O2 -fPIC -fvisibility=hidden -fvisibility-inlines-hidden -ffp-contract=off
       -fno-strict-aliasing -Wall -Wno-unknown-pragmas -Wno-sign-compare)
g++ "${flags[@]}" -c -o "$out/kernels.o" "$here/kernels.cpp" &
g++ "${flags[@]}" -c -o "$out/kernels_flash.o" "$here/kernels_flash.cpp" &
g++ "${flags[@]}" -c -o "$out/driver.o" "$here/driver.cpp" &
wait %1 && wait %2 && wait %3
# The soname lets a library that asks the loader for libcuda.so.1 find this one once loaded,
# however it was opened (the cuBLAS stand-ins look for the driver's capture hook that way).
g++ -shared -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1" "$out/driver.o" "$out/kernels.o" \
    "$out/kernels_flash.o"
g++ "${flags[@]}" -shared -o "$out/libcublasLt.so.13" "$here/cublaslt.cpp" -ldl
g++ "${flags[@]}" -shared -o "$out/libcublas.so.13" "$here/cublas.cpp" -ldl
g++ "${flags[@]}" -shared -o "$out/libnccl.so.2" "$here/nccl.cpp"
echo "$out"
