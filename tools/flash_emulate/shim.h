// shim.h: runs kernels/flash_attention.cu's kernels (fp32 and bf16) on the CPU for checking on a
// machine without a GPU: the shared kernel emulator (tools/kernel_emulate/shim.h: one
// fiber per CUDA thread, barriers for __syncthreads and warp shuffles) plus what the
// flash-attention kernels need: dynamic and static shared memory as one NaN-filled array
// per block, mma.sync, ldmatrix and cp.async.
#pragma once
#include "../kernel_emulate/shim.h"
#include <vector>

// flash_attention.cu declares `extern __shared__ float smem[]` (the array below) and its
// static shared arrays through FA_STATIC_SHARED.
#undef __shared__
#define __shared__
#define FA_STATIC_SHARED static
inline float smem[1 << 16];

// ex2.approx.ftz.f32 (fa_exp2 in kernels/flash_attention.cu): 2^x, here to the last bit;
// the hardware's is within ~2^-22 relative, a difference the checks' tolerances cover.
inline float fa_exp2(float x) { return std::exp2(x); }

// cp.async (fa_cp_async16/4, fa_cp_commit, fa_cp_wait<N>: see kernels/flash_attention.cu)
// for one thread. Where a copy lands is the check:
// - by default each copy lands when its issuer waits for its group, so a thread that
//   reads a tile before the issuers' waits and the __syncthreads() after them (a missing
//   wait or barrier) reads the tile's old bytes;
// - with FLASH_EMU_CP_ASYNC=issue each copy lands as it is issued, so a copy into a tile
//   another warp still reads (a missing barrier before the issue) changes what that warp
//   reads (the fibers of a block run one after another, each up to its next barrier).
// A kernel whose results are the same bits in both modes waits and synchronises where it
// must. A block that leaves copies never waited for fails the next block.
struct EmuCopy {
    void* dst;
    const void* src;
    int bytes;
    bool valid;
};
inline std::vector<EmuCopy> cp_open[1024];                 // issued, not committed
inline std::vector<std::vector<EmuCopy>> cp_groups[1024];  // committed, oldest first
inline const bool cp_at_issue = [] {
    const char* m = std::getenv("FLASH_EMU_CP_ASYNC");
    return m != nullptr && std::strcmp(m, "issue") == 0;
}();
inline void emu_cp_land(const EmuCopy& c) {
    if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
    else std::memset(c.dst, 0, c.bytes);
}
inline void emu_cp_async(void* dst, const void* src, int bytes, bool valid) {
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
        reinterpret_cast<uintptr_t>(src) % bytes != 0)
        emu_fail("cp.async: an address is not aligned to the copy size");
    EmuCopy c{dst, src, bytes, valid};
    if (cp_at_issue) emu_cp_land(c);
    else cp_open[threadIdx.x].push_back(c);
}
inline void fa_cp_async16(void* dst, const void* src, bool valid) {
    emu_cp_async(dst, src, 16, valid);
}
inline void fa_cp_async4(void* dst, const void* src, bool valid) {
    emu_cp_async(dst, src, 4, valid);
}
inline void fa_cp_commit() {
    cp_groups[threadIdx.x].push_back(std::move(cp_open[threadIdx.x]));
    cp_open[threadIdx.x].clear();
}
template <int N>
inline void fa_cp_wait() {
    auto& groups = cp_groups[threadIdx.x];
    while (groups.size() > N) {
        for (const EmuCopy& c : groups.front()) emu_cp_land(c);
        groups.erase(groups.begin());
    }
}

// Before each block: NaN garbage, as uninitialised shared memory, and no copy of the last
// block left in flight.
inline const bool smem_hook = (emu_before_block = [] {
    std::memset(smem, 0xff, sizeof(smem));
    for (int t = 0; t < 1024; t++) {
        if (!cp_open[t].empty() || !cp_groups[t].empty())
            emu_fail("cp.async: a block ended with copies it never waited for");
    }
}, true);

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
    emu_warp_sync(w);
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
    emu_warp_sync(w);
    int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
    for (int e = 0; e < 4; e++) {
        float acc = 0.0f;
        for (int k = 0; k < 16; k++) acc += A[rows[e]][k] * B[k][cols[e]];
        c[e] += acc;
    }
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 for one warp, as documented above
// fa_ldsm_x4_trans in kernels/flash_attention.cu: every lane publishes the row address it
// supplies (lane 8i + r: row r of matrix i, 16 bytes, which must be 16-byte aligned), then
// takes from matrix i the elements (row 2q, column g) and (row 2q + 1, column g) into r[i].
inline const unsigned short* ldsm_row[1024];
inline void fa_ldsm_x4_trans(unsigned (&r)[4], const unsigned short* row) {
    int t = threadIdx.x, w = t >> 5, lane = t & 31, g = lane >> 2, q = lane & 3;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
        emu_fail("ldmatrix: a row address is not 16-byte aligned");
    ldsm_row[t] = row;
    emu_warp_sync(w);
    unsigned out[4];
    for (int i = 0; i < 4; i++) {
        const unsigned short* lo = ldsm_row[(w << 5) | (8 * i + 2 * q)];
        const unsigned short* hi = ldsm_row[(w << 5) | (8 * i + 2 * q + 1)];
        out[i] = (unsigned)lo[g] | ((unsigned)hi[g] << 16);
    }
    emu_warp_sync(w);
    for (int i = 0; i < 4; i++) r[i] = out[i];
}
