// shim.h: runs kernels/flash_attention.cu's fp32 kernels on the CPU for checking on a
// machine without a GPU: one std::thread per CUDA thread, std::barrier for
// __syncthreads and per-warp barriers for __shfl_xor_sync. Blocks run one after another.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
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
#define __shared__
inline float smem[1 << 16];
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float shfl_buf[1024];

inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline float __int_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    int t = threadIdx.x, w = t >> 5;
    shfl_buf[t] = v;
    warp_bars[w]->arrive_and_wait();
    float r = shfl_buf[(w << 5) | ((t & 31) ^ o)];
    warp_bars[w]->arrive_and_wait();
    return r;
}

// Runs `k` over the grid with `threads` threads per block.
inline void emulate(dim3 grid, unsigned threads, const std::function<void()>& k) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx_shared = dim3{x, y, z};
                std::memset(smem, 0xff, sizeof(smem));  // NaN garbage, as uninitialised
                block_bar = std::make_unique<std::barrier<>>(threads);
                warp_bars.clear();
                for (unsigned w = 0; w < threads / 32; w++)
                    warp_bars.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; t++)
                    ts.emplace_back([t, &k] { threadIdx = dim3{t, 0, 0}; k(); });
                for (auto& th : ts) th.join();
            }
}
