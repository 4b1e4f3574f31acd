// shim.h: runs the CUDA C kernels of kernels/*.cu on the CPU, for checking them on a machine
// without a GPU. One std::thread per CUDA thread (std::barrier for __syncthreads, per-warp
// barriers for __shfl_xor_sync); blocks run one after another. Kernels without barriers or
// shuffles can run with emulate_serial (the threads of a block one after another).
//
// Included (before the kernel sources) by tools/kernel_emulate/main.cpp and, with the
// flash-attention extras, by tools/flash_emulate/shim.h.
//
// What the shim provides: dim3 threadIdx / blockIdx / blockDim / gridDim; the qualifiers
// as nothing (__shared__ as `static`: one array per block, since blocks run in turn);
// float4 / uint2 with make_float4; __ldg (a plain load); __fadd_rn / __fsub_rn / __fmul_rn
// (IEEE single operations: build with -ffp-contract=off); the bit casts; atomicAdd on float;
// and VEC_ACCESS (kernels/common.cuh), which checks the alignment of every vector access
// and counts them (vec_accesses).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx;
inline dim3 blockIdx_shared, gridDim, blockDim;
#define blockIdx blockIdx_shared
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float shfl_buf[1024];
inline bool emu_threads = false;  // false under emulate_serial: no barriers, no shuffles

// What is running (set by the checker), named when a run stops.
inline std::string emu_current;

[[noreturn]] inline void emu_fail(const char* what) {
    std::fflush(stdout);
    std::fprintf(stderr, "emulator: %s (in %s)\n", what, emu_current.c_str());
    std::abort();
}

inline void __syncthreads() {
    if (!emu_threads) emu_fail("__syncthreads in a kernel run with emulate_serial");
    block_bar->arrive_and_wait();
}
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    if (!emu_threads) emu_fail("__shfl_xor_sync in a kernel run with emulate_serial");
    int t = threadIdx.x, w = t >> 5;
    shfl_buf[t] = v;
    warp_bars[w]->arrive_and_wait();
    float r = shfl_buf[(w << 5) | ((t & 31) ^ o)];
    warp_bars[w]->arrive_and_wait();
    return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
template <class T> inline T __ldg(const T* p) { return *p; }

inline std::mutex atomic_mutex;
inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> lock(atomic_mutex);
    float old = *p;
    *p = old + v;
    return old;
}

// Vector accesses: counted, and a misaligned one stops the run (a GPU faults on it).
inline std::atomic<long long> vec_accesses{0};
inline void emu_vec_access(const void* p, unsigned bytes) {
    if ((uintptr_t)p % bytes != 0) {
        char msg[96];
        std::snprintf(msg, sizeof msg, "misaligned %u-byte vector access at %p", bytes, p);
        emu_fail(msg);
    }
    vec_accesses++;
}
#define VEC_ACCESS(p, bytes) emu_vec_access((p), (bytes))

inline void emu_block_begin(unsigned threads) {
    block_bar = std::make_unique<std::barrier<>>(threads);
    warp_bars.clear();
    for (unsigned w = 0; w < (threads + 31) / 32; w++)
        warp_bars.push_back(std::make_unique<std::barrier<>>(32));
}

// Hook run before each block (the flash-attention shim fills its shared memory with NaN).
inline std::function<void()> emu_before_block;

// Runs `k` over the grid with `threads` threads per block, one std::thread each.
inline void emulate(dim3 grid, unsigned threads, const std::function<void()>& k) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    emu_threads = true;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx_shared = dim3{x, y, z};
                if (emu_before_block) emu_before_block();
                emu_block_begin(threads);
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([t, &k] { threadIdx = dim3{t, 0, 0}; k(); });
                for (auto& th : ts) th.join();
            }
}

// Runs `k` over the grid with the threads of each block one after another: only for
// kernels with no __syncthreads and no shuffles (using one stops the run).
inline void emulate_serial(dim3 grid, unsigned threads, const std::function<void()>& k) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    emu_threads = false;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx_shared = dim3{x, y, z};
                for (unsigned t = 0; t < threads; t++) {
                    threadIdx = dim3{t, 0, 0};
                    k();
                }
            }
}
