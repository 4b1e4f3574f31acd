// shim.h: runs the CUDA C kernels of kernels/*.cu on the CPU, for checking them on a machine
// without a GPU. Blocks run one after another; the threads of a block run in one of two ways:
//   emulate         one fiber per CUDA thread, all on the calling thread, switched
//                   at __syncthreads and at warp exchanges (__shfl_xor_sync, mma), which are
//                   barriers over the block or the warp; a barrier no thread can pass (a
//                   __syncthreads some threads never reach) stops the run as a deadlock
//                   instead of hanging;
//   emulate_serial  the threads one after another, for kernels without barriers or shuffles.
// The order in which emulate runs the fibers of a block (any order is one the GPU may run):
//   by default     round robin over the threads, each up to its next barrier, so the warps
//                  of a block advance nearly in step;
//   EMU_SCHEDULE=warps (or warps_reversed)
//                  each warp in turn (first to last, or last to first) runs as far as it can
//                  (to a __syncthreads the others have not reached) before the next starts,
//                  so one warp gets as far ahead of the others as a barrier lets it: a
//                  missing barrier between a warp's write and another warp's read or write
//                  of the same shared bytes shows up as a wrong result.
//
// Included (before the kernel sources) by tools/kernel_emulate/main.cpp, by the emulated
// driver in tools/gpu_emulate and, with the flash-attention extras, by
// tools/flash_emulate/shim.h.
//
// What the shim provides: dim3 threadIdx / blockIdx / blockDim / gridDim; the qualifiers
// as nothing (__shared__ as `static`: one array per block, since blocks run in turn);
// float4 / uint2 with make_float4; __ldg (a plain load); __fadd_rn / __fsub_rn / __fmul_rn
// (IEEE single operations: build with -ffp-contract=off); the bit casts; atomicAdd on float;
// and VEC_ACCESS (kernels/common.cuh), which checks the alignment of every vector access
// and counts them (vec_accesses).
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <string>
#include <csetjmp>
#include <ucontext.h>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx;
inline dim3 blockIdx_shared, gridDim, blockDim;
#define blockIdx blockIdx_shared
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
inline float shfl_buf[1024];
inline bool emu_threads = false;  // false under emulate_serial: no barriers, no shuffles

// What is running (set by the checker), named when a run stops.
inline std::string emu_current;

[[noreturn]] inline void emu_fail(const char* what) {
    std::fflush(stdout);
    std::fprintf(stderr, "emulator: %s (in %s)\n", what, emu_current.c_str());
    std::abort();
}

// ------------------------------------------------------------------ fibers
// A fiber barrier: the last of `expected` arrivals opens it; the others yield to the
// scheduler until it has opened.
struct EmuFiberBarrier {
    unsigned expected = 0, arrived = 0;
    unsigned long long generation = 0;
};
// A fiber: its own stack, entered once through ucontext (makecontext), then switched with
// _setjmp/_longjmp, which save no signal mask and so make no system call. A fiber runs the
// kernel body for one thread of a block, parks, and runs it again for the next block.
struct EmuFiber {
    std::jmp_buf at;
    std::unique_ptr<char[]> stack;
    bool started = false;
    bool done = false;
};
inline constexpr size_t EMU_FIBER_STACK = 256 << 10;
inline std::jmp_buf emu_scheduler;
inline std::vector<std::unique_ptr<EmuFiber>> emu_fiber_pool;
inline EmuFiber* emu_running = nullptr;
inline const std::function<void()>* emu_fiber_body = nullptr;
inline unsigned long long emu_progress = 0;  // arrivals and finished threads
inline EmuFiberBarrier emu_block_fbar;
inline std::vector<EmuFiberBarrier> emu_warp_fbars;

// From the running fiber back to the scheduler; returns when the scheduler resumes it.
inline void emu_park() {
    if (!_setjmp(emu_running->at)) _longjmp(emu_scheduler, 1);
}

inline void emu_fiber_wait(EmuFiberBarrier& b) {
    unsigned long long g = b.generation;
    emu_progress++;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        b.generation++;
        return;
    }
    while (b.generation == g) emu_park();
}

inline void emu_fiber_main() {
    for (;;) {
        (*emu_fiber_body)();
        emu_running->done = true;
        emu_progress++;
        emu_park();
    }
}

// Runs fiber `f` until it parks (at a barrier, or done with its thread).
inline void emu_resume(EmuFiber& f) {
    emu_running = &f;
    if (_setjmp(emu_scheduler)) return;
    if (f.started) _longjmp(f.at, 1);
    f.started = true;
    ucontext_t here, entry;
    getcontext(&entry);
    entry.uc_stack.ss_sp = f.stack.get();
    entry.uc_stack.ss_size = EMU_FIBER_STACK;
    entry.uc_link = nullptr;  // emu_fiber_main never returns
    makecontext(&entry, emu_fiber_main, 0);
    swapcontext(&here, &entry);
}

inline void emu_block_sync() { emu_fiber_wait(emu_block_fbar); }
inline void emu_warp_sync(int w) { emu_fiber_wait(emu_warp_fbars[w]); }

inline void __syncthreads() {
    if (!emu_threads) emu_fail("__syncthreads in a kernel run with emulate_serial");
    emu_block_sync();
}
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int min(int a, int b) { return a < b ? a : b; }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    if (!emu_threads) emu_fail("__shfl_xor_sync in a kernel run with emulate_serial");
    int t = threadIdx.x, w = t >> 5;
    shfl_buf[t] = v;
    emu_warp_sync(w);
    float r = shfl_buf[(w << 5) | ((t & 31) ^ o)];
    emu_warp_sync(w);
    return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
template <class T> inline T __ldg(const T* p) { return *p; }

// Threads switch only at barriers, so a read-modify-write is atomic as it stands.
inline float atomicAdd(float* p, float v) {
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

enum class EmuSchedule { RoundRobin, Warps, WarpsReversed };
inline const EmuSchedule emu_schedule = [] {
    const char* m = std::getenv("EMU_SCHEDULE");
    if (m == nullptr || *m == 0) return EmuSchedule::RoundRobin;
    if (std::strcmp(m, "warps") == 0) return EmuSchedule::Warps;
    if (std::strcmp(m, "warps_reversed") == 0) return EmuSchedule::WarpsReversed;
    std::fprintf(stderr, "emulator: EMU_SCHEDULE=%s: expected warps or warps_reversed\n", m);
    std::exit(2);
}();

// Hook run before each block (the flash-attention shim fills its shared memory with NaN).
inline std::function<void()> emu_before_block;

// Blocks run first to last, or with this set last to first (both are orders the GPU may
// run them in): a kernel whose result depends on the order of its blocks (atomics adding
// into one place) gives different bits under the two.
inline bool emu_blocks_reversed = false;

// Block index `i` of `n` in the order emu_blocks_reversed says.
inline unsigned emu_block(unsigned i, unsigned n) { return emu_blocks_reversed ? n - 1 - i : i; }

// Runs `k` over the grid with `threads` threads per block, one fiber each, on the calling
// thread (see the top of this file).
inline void emulate(dim3 grid, unsigned threads, const std::function<void()>& k) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    emu_threads = true;
    emu_fiber_body = &k;
    while (emu_fiber_pool.size() < threads) {
        auto f = std::make_unique<EmuFiber>();
        f->stack.reset(new char[EMU_FIBER_STACK]);  // not zeroed: untouched pages stay unmapped
        emu_fiber_pool.push_back(std::move(f));
    }
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx_shared = dim3{emu_block(x, grid.x), emu_block(y, grid.y), emu_block(z, grid.z)};
                if (emu_before_block) emu_before_block();
                emu_block_fbar = EmuFiberBarrier{threads, 0, 0};
                emu_warp_fbars.assign((threads + 31) / 32, EmuFiberBarrier{32, 0, 0});
                if (threads % 32) emu_warp_fbars.back().expected = threads % 32;
                for (unsigned t = 0; t < threads; t++) emu_fiber_pool[t]->done = false;
                unsigned live = threads;
                // Resumes the live threads of [first, end) once each.
                auto pass = [&](unsigned first, unsigned end) {
                    for (unsigned t = first; t < end; t++) {
                        EmuFiber& f = *emu_fiber_pool[t];
                        if (f.done) continue;
                        threadIdx = dim3{t, 0, 0};
                        emu_resume(f);
                        if (f.done) live--;
                    }
                };
                const unsigned warps = (threads + 31) / 32;
                while (live > 0) {
                    unsigned long long before = emu_progress;
                    if (emu_schedule == EmuSchedule::RoundRobin) {
                        pass(0, threads);
                    } else {
                        for (unsigned i = 0; i < warps; i++) {
                            unsigned w = emu_schedule == EmuSchedule::Warps ? i : warps - 1 - i;
                            unsigned long long warp_before;
                            do {  // until the warp makes no progress: blocked or done
                                warp_before = emu_progress;
                                pass(32 * w, std::min(threads, 32 * w + 32));
                            } while (emu_progress != warp_before);
                        }
                    }
                    if (live > 0 && emu_progress == before) {
                        emu_fail("deadlock: every live thread waits at a barrier no other "
                                 "thread will reach (__syncthreads or a warp exchange in "
                                 "divergent code)");
                    }
                }
            }
    emu_running = nullptr;
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
                blockIdx_shared = dim3{emu_block(x, grid.x), emu_block(y, grid.y), emu_block(z, grid.z)};
                for (unsigned t = 0; t < threads; t++) {
                    threadIdx = dim3{t, 0, 0};
                    k();
                }
            }
}
