// shim.h: runs kernels/flash_attention.cu's kernels (fp32 and bf16) on the CPU for checking on a
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
#define __align__(n) __attribute__((aligned(n)))
#define FA_STATIC_SHARED static
inline float smem[1 << 16];
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
inline float shfl_buf[1024];

inline void __syncthreads() { block_bar->arrive_and_wait(); }
inline float __int_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
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

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for one warp, from the fragment
// layouts documented in kernels/flash_attention.cu: every lane publishes its fragments,
// then computes its own four D elements from the whole A (16x16) and B (16x8).
inline unsigned mma_frag[1024][6];
inline float bf2f(unsigned short h) { return __int_as_float((unsigned)h << 16); }
inline void fa_mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                        unsigned b0, unsigned b1) {
    int t = threadIdx.x, w = t >> 5, lane = t & 31, g = lane >> 2, q = lane & 3;
    unsigned* f = mma_frag[t];
    f[0] = a0; f[1] = a1; f[2] = a2; f[3] = a3; f[4] = b0; f[5] = b1;
    warp_bars[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const unsigned* r = mma_frag[(w << 5) | l];
        int lg = l >> 2, lq = l & 3;
        for (int half = 0; half < 2; half++) {
            auto el = [&](unsigned reg) { return bf2f((unsigned short)(reg >> (16 * half))); };
            A[lg][2 * lq + half] = el(r[0]);
            A[lg + 8][2 * lq + half] = el(r[1]);
            A[lg][2 * lq + 8 + half] = el(r[2]);
            A[lg + 8][2 * lq + 8 + half] = el(r[3]);
            B[2 * lq + half][lg] = el(r[4]);
            B[2 * lq + 8 + half][lg] = el(r[5]);
        }
    }
    warp_bars[w]->arrive_and_wait();
    int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int e = 0; e < 4; e++) {
        float acc = 0.0f;
        for (int k = 0; k < 16; k++) acc += A[rows[e]][k] * B[k][cols[e]];
        c[e] += acc;
    }
}
