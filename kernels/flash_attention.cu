// flash_attention.cu: fused causal self-attention (flash-attention style): the T x T
// score matrix is never written to memory. Scores are computed tile by tile in shared
// memory, softmax runs online (running max and sum per query row, fp32), and the backward
// pass recomputes the probabilities from Q, K and the forward's per-row logsumexp.
//
// Layout (the engine's): qkv is (B*T, 3C) fp32 row-major, q | k | v, head h in columns
// h*hs .. h*hs+hs of each third (hs = C / NH, at most 128). The output y (B*T, C) holds the
// heads side by side; lse (B, NH, T) holds logsumexp_j(scale * q_i . k_j) over j <= i.
// dqkv (B*T, 3C) receives dq | dk | dv (overwritten, every element of the first T rows).
// scale is 1/sqrt(hs). Causal: query i attends to keys j <= i. No attention dropout.
//
// The fp32 kernels: 256 threads (8 warps) per block, one block per (tile, head, batch row):
// grid (ceil(T / tile rows), NH, B). Tile sizes are launch arguments (multiples of 8, at
// most 32), chosen with the dynamic shared memory size by src/engine/cuda/flash.rs.
// Rows past T are loaded as zeros and never written.
//
// flash_attn_fwd_f32(qkv, y, lse, T, C, NH, br, bc, scale)           fp32 SIMT
//   Block: br query rows; loops over key tiles of bc rows up to the causal limit.
//   Shared floats: br*(hs+1) [Q] + bc*(hs+1) [K] + bc*hs [V] + br*(bc+1) [S/P] + 3*br.
//
// flash_attn_fwd_bf16(qkv, y, lse, T, C, NH, scale)                  bf16 tensor cores
//   Same contract with bf16 inputs to the products (fp32 accumulation and softmax); needs
//   sm_80+, hs a multiple of 16 and at most 128; 128 query rows per block (8 warps of 16
//   rows, 256 threads), key tiles of 64: each K and V tile loaded serves 128 query rows
//   (a warp whose rows see none of a tile's keys skips its products, so every row does
//   the same arithmetic as with 64-row blocks). Shared: static (see the kernel), no
//   dynamic shared memory.
//
// flash_attn_fwd_bf16_io(qkv, y, lse, T, C, NH, scale)
//   flash_attn_fwd_bf16 with qkv and y stored in bf16 (the bf16 mode's attention storage):
//   the same arithmetic on the same bf16 values, so y is flash_attn_fwd_bf16's output
//   rounded to bf16 and lse is the same, when qkv holds the values it would round.
//
// Head size: every bf16 kernel (forward, backward, both storages) also comes as *_hs64,
// the same code compiled for hs = 64 exactly (GPT-2's head size at every model size): its
// register arrays and shared tiles are sized for 64 instead of FA_MAX_HS, and every loop
// and guard over the head dimension is resolved at compile time. The same arithmetic in
// the same order, so the same bits (tools/flash_emulate checks it); for sm_90 ptxas gives
// it 128 (forward), 168 (dk/dv) and 125 (dq) registers per thread against 198, 255 and
// 204 for the generic form, and half the shared memory, so 16 (forward and dq: 2 blocks of
// 8 warps) and 12 (dk/dv: 3 blocks of 4) warps fit on a multiprocessor instead of 8.
//
// Tile loads (bf16 kernels): with bf16 storage every tile reaches shared memory by
// cp.async, issued one tile ahead of the products that read it, so the loads of the next
// tile overlap the tensor-core work on this one (the forward: the V tile's copies run
// while S = Q K^T and the softmax do, the next K tile's while P V does; the backward
// kernels: two buffers of their loop's tiles, the next filled while the current is read).
// fp32 storage rounds each value to bf16 on the way, so its loads are synchronous, in the
// same places. Loads move data only: the same bits as synchronous loads (tools/flash_emulate
// runs the kernels under schedules that expose a missing wait or barrier).
//
// Exponentials (bf16 kernels): in base 2 on the special-function unit (see FaExp below);
// every bf16 kernel also comes as *_expf, the same code with the accurate expf in natural
// units, for the flash_exp2 switch (not the same bits: P differs in the last bits of fp32).
//
// flash_attn_bwd_dot(y, dy, dvec, B, T, C, NH)
//   dvec[(b*NH+h)*T+t] = sum_d y[.., h*hs+d] * dy[.., h*hs+d]  (the D of the backward).
//   One warp per row; block 256 (8 rows), grid ceil(B*NH*T / 8).
//
// flash_attn_bwd_dot_bf16(y, dy, dvec, B, T, C, NH)
//   The same with y and dy in bf16 (widened exactly; fp32 sums in the same order).
//
// flash_attn_bwd_dkdv_f32(qkv, dy, lse, dvec, dqkv, T, C, NH, bt, scale)
//   Block: bt keys; loops over query tiles from the diagonal to T; accumulates dk and dv
//   in registers and writes them once. Shared floats: 4*bt*(hs+1) + 2*bt*(bt+1) + 2*bt.
//
// flash_attn_bwd_dq_f32(qkv, dy, lse, dvec, dqkv, T, C, NH, bt, scale)
//   Block: bt queries; loops over key tiles up to the diagonal; accumulates dq in
//   registers. dq gets its own pass (recomputing P and dP) instead of atomics from the
//   dk/dv pass: every element is written exactly once, in a fixed summation order
//   (deterministic, like the rest of the engine), and dqkv needs no zeroing first.
//   Shared: as flash_attn_bwd_dkdv_f32.
//
// Backward formulas (P = softmax rows, dP = dy v^T, D_i = sum_j P_ij dP_ij = dy_i . y_i):
//   dv = P^T dy,  dS = P * (dP - D),  dq = scale * dS k,  dk = scale * dS^T q.

// Compiled as KERNEL_PARTS programs (see kernels/common.cuh): part 0 emits the fp32
// kernels and the D dot products, parts 1-12 the bf16 kernels, three entry points each
// (their templates take most of NVRTC's time), so a first start compiles them on separate
// threads instead of one after another. Parts 7-12, the forms with the accurate expf, are
// compiled only for an engine that runs them (the flash_exp2 switch off), so a default first
// start does not wait for them.
#define KERNEL_PARTS 13
#define KERNEL_PARTS_ON_DEMAND 7

#define FA_THREADS 256
#define FA_MAX_HS 128
#define FA_DCHUNKS 4  // FA_MAX_HS / 32: head-dimension columns per lane
#define FA_MAX_ROWS 4 // 32 / 8: tile rows per warp

__device__ __forceinline__ float fa_neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float fa_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float fa_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Copies rows [r0, r0+rows) of one head's hs columns (src points at row 0, column h*hs of
// its third; rows ld_src floats apart) into dst[r*ld_dst + d]; rows >= T become zeros.
__device__ __forceinline__ void fa_load_tile(float* dst, int ld_dst, const float* src,
                                             long long ld_src, int r0, int rows, int T,
                                             int hs) {
    for (int i = threadIdx.x; i < rows * hs; i += FA_THREADS) {
        int r = i / hs, d = i - r * hs;
        int t = r0 + r;
        dst[r * ld_dst + d] = t < T ? src[(long long)t * ld_src + d] : 0.0f;
    }
}

// --------------------------------------------------------------------------- forward fp32

#if KERNEL_IN_PART(0)
extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attn_fwd_f32(const float* __restrict__ qkv, float* __restrict__ y,
                   float* __restrict__ lse, int T, int C, int NH, int br, int bc,
                   float scale) {
    extern __shared__ float smem[];
    const int hs = C / NH, ld = hs + 1, lds = bc + 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The last query tiles see the most keys: start them first.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * br;
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const float* qb = qkv + (long long)b * T * c3 + (long long)h * hs;
    float* Qs = smem;
    float* Ks = Qs + br * ld;
    float* Vs = Ks + bc * ld;
    float* Ss = Vs + bc * hs;
    float* row_m = Ss + br * lds;
    float* row_l = row_m + br;
    float* row_a = row_l + br;

    fa_load_tile(Qs, ld, qb, c3, q0, br, T, hs);
    if (threadIdx.x < br) {
        row_m[threadIdx.x] = fa_neg_inf();
        row_l[threadIdx.x] = 0.0f;
    }
    float acc[FA_MAX_ROWS][FA_DCHUNKS];
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++)
#pragma unroll
        for (int j = 0; j < FA_DCHUNKS; j++) acc[i][j] = 0.0f;

    const int kend = min(T, q0 + br);  // keys [0, kend) can be seen by this tile
    for (int k0 = 0; k0 < kend; k0 += bc) {
        __syncthreads();  // the previous tile's readers are done
        fa_load_tile(Ks, ld, qb + C, c3, k0, bc, T, hs);
        fa_load_tile(Vs, hs, qb + 2 * C, c3, k0, bc, T, hs);
        __syncthreads();
        // S = scale * Q K^T, masked with -inf. Rows past T use the mask of row T-1, so
        // every row sees key 0 in the first tile and its running max is finite after it.
        for (int i = threadIdx.x; i < br * bc; i += FA_THREADS) {
            int r = i / bc, c = i - r * bc;
            int qi = min(q0 + r, T - 1), kj = k0 + c;
            float s = fa_neg_inf();
            if (kj <= qi) {
                const float* qr = Qs + r * ld;
                const float* kr = Ks + c * ld;
                float dot = 0.0f;
                for (int d = 0; d < hs; d++) dot += qr[d] * kr[d];
                s = dot * scale;
            }
            Ss[r * lds + c] = s;
        }
        __syncthreads();
        // Online softmax: one warp per row, one lane per key (bc <= 32).
        for (int r = warp; r < br; r += FA_THREADS / 32) {
            float s = lane < bc ? Ss[r * lds + lane] : fa_neg_inf();
            float m_old = row_m[r];
            float m_new = fmaxf(m_old, fa_warp_max(s));  // finite (see above)
            float p = lane < bc ? expf(s - m_new) : 0.0f;
            float sum = fa_warp_sum(p);
            if (lane < bc) Ss[r * lds + lane] = p;
            if (lane == 0) {
                float a = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                row_m[r] = m_new;
                row_l[r] = row_l[r] * a + sum;
                row_a[r] = a;
            }
        }
        __syncthreads();
        // O = a * O + P V: rows warp + 8*i, columns lane + 32*j.
#pragma unroll
        for (int i = 0; i < FA_MAX_ROWS; i++) {
            int r = warp + 8 * i;
            if (r < br) {
                float a = row_a[r];
#pragma unroll
                for (int j = 0; j < FA_DCHUNKS; j++) acc[i][j] *= a;
                for (int c = 0; c < bc; c++) {
                    float p = Ss[r * lds + c];
#pragma unroll
                    for (int j = 0; j < FA_DCHUNKS; j++) {
                        int d = lane + 32 * j;
                        if (d < hs) acc[i][j] += p * Vs[c * hs + d];
                    }
                }
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++) {
        int r = warp + 8 * i, t = q0 + r;
        if (r < br && t < T) {
            float inv = 1.0f / row_l[r];
            float* yr = y + ((long long)b * T + t) * C + (long long)h * hs;
#pragma unroll
            for (int j = 0; j < FA_DCHUNKS; j++) {
                int d = lane + 32 * j;
                if (d < hs) yr[d] = acc[i][j] * inv;
            }
        }
    }
    if (threadIdx.x < br && q0 + (int)threadIdx.x < T) {
        int r = threadIdx.x;
        lse[((long long)b * NH + h) * T + q0 + r] = row_m[r] + logf(row_l[r]);
    }
}

// --------------------------------------------------------------------------- backward

// flash_attn_bwd_dot (D of the backward, fp32 or bf16 y and dy): after the bf16 helpers
// below.

// P_rc and dS_rc of one (query r, key c) pair of the current tiles; 0 when masked.
__device__ __forceinline__ void fa_p_ds(const float* Qs, const float* dOs, const float* Ks,
                                        const float* Vs, const float* Ls, const float* Ds,
                                        int ld, int hs, int r, int c, int qi, int kj, int T,
                                        float scale, float* p_out, float* ds_out) {
    float p = 0.0f, ds = 0.0f;
    if (qi < T && kj <= qi) {
        const float* qr = Qs + r * ld;
        const float* kr = Ks + c * ld;
        const float* gr = dOs + r * ld;
        const float* vr = Vs + c * ld;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < hs; d++) {
            s += qr[d] * kr[d];
            dp += gr[d] * vr[d];
        }
        p = expf(s * scale - Ls[r]);
        ds = p * (dp - Ds[r]);
    }
    *p_out = p;
    *ds_out = ds;
}

// Loads lse and dvec of rows [r0, r0+rows) of head (b, h) into Ls, Ds (zeros past T).
__device__ __forceinline__ void fa_load_rows(float* Ls, float* Ds, const float* lse,
                                             const float* dvec, long long bh, int r0,
                                             int rows, int T) {
    for (int r = threadIdx.x; r < rows; r += FA_THREADS) {
        int t = r0 + r;
        Ls[r] = t < T ? lse[bh * T + t] : 0.0f;
        Ds[r] = t < T ? dvec[bh * T + t] : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attn_bwd_dkdv_f32(const float* __restrict__ qkv, const float* __restrict__ dy,
                        const float* __restrict__ lse, const float* __restrict__ dvec,
                        float* __restrict__ dqkv, int T, int C, int NH, int bt,
                        float scale) {
    extern __shared__ float smem[];
    const int hs = C / NH, ld = hs + 1, lds = bt + 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int k0 = blockIdx.x * bt;  // the first key tiles see the most queries
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const long long bh = (long long)b * NH + h;
    const float* qb = qkv + (long long)b * T * c3 + (long long)h * hs;
    const float* gb = dy + (long long)b * T * C + (long long)h * hs;
    float* Ks = smem;
    float* Vs = Ks + bt * ld;
    float* Qs = Vs + bt * ld;
    float* dOs = Qs + bt * ld;
    float* Ps = dOs + bt * ld;
    float* dSs = Ps + bt * lds;
    float* Ls = dSs + bt * lds;
    float* Ds = Ls + bt;

    fa_load_tile(Ks, ld, qb + C, c3, k0, bt, T, hs);
    fa_load_tile(Vs, ld, qb + 2 * C, c3, k0, bt, T, hs);
    float dk[FA_MAX_ROWS][FA_DCHUNKS], dv[FA_MAX_ROWS][FA_DCHUNKS];
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++)
#pragma unroll
        for (int j = 0; j < FA_DCHUNKS; j++) {
            dk[i][j] = 0.0f;
            dv[i][j] = 0.0f;
        }
    // Queries i >= k0 can see this tile's keys; tiles are aligned (same bt for both).
    for (int q0 = k0; q0 < T; q0 += bt) {
        __syncthreads();
        fa_load_tile(Qs, ld, qb, c3, q0, bt, T, hs);
        fa_load_tile(dOs, ld, gb, C, q0, bt, T, hs);
        fa_load_rows(Ls, Ds, lse, dvec, bh, q0, bt, T);
        __syncthreads();
        for (int i = threadIdx.x; i < bt * bt; i += FA_THREADS) {
            int r = i / bt, c = i - r * bt;
            float p, ds;
            fa_p_ds(Qs, dOs, Ks, Vs, Ls, Ds, ld, hs, r, c, q0 + r, k0 + c, T, scale, &p, &ds);
            Ps[r * lds + c] = p;
            dSs[r * lds + c] = ds;
        }
        __syncthreads();
        // dv += P^T dO, dk += dS^T Q: key rows warp + 8*i, columns lane + 32*j.
#pragma unroll
        for (int i = 0; i < FA_MAX_ROWS; i++) {
            int c = warp + 8 * i;
            if (c < bt) {
                for (int r = 0; r < bt; r++) {
                    float p = Ps[r * lds + c], ds = dSs[r * lds + c];
#pragma unroll
                    for (int j = 0; j < FA_DCHUNKS; j++) {
                        int d = lane + 32 * j;
                        if (d < hs) {
                            dv[i][j] += p * dOs[r * ld + d];
                            dk[i][j] += ds * Qs[r * ld + d];
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++) {
        int c = warp + 8 * i, t = k0 + c;
        if (c < bt && t < T) {
            float* out = dqkv + ((long long)b * T + t) * c3 + (long long)h * hs;
#pragma unroll
            for (int j = 0; j < FA_DCHUNKS; j++) {
                int d = lane + 32 * j;
                if (d < hs) {
                    out[C + d] = dk[i][j] * scale;
                    out[2 * C + d] = dv[i][j];
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(FA_THREADS)
flash_attn_bwd_dq_f32(const float* __restrict__ qkv, const float* __restrict__ dy,
                      const float* __restrict__ lse, const float* __restrict__ dvec,
                      float* __restrict__ dqkv, int T, int C, int NH, int bt, float scale) {
    extern __shared__ float smem[];
    const int hs = C / NH, ld = hs + 1, lds = bt + 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * bt;  // the last query tiles see the most keys
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const long long bh = (long long)b * NH + h;
    const float* qb = qkv + (long long)b * T * c3 + (long long)h * hs;
    const float* gb = dy + (long long)b * T * C + (long long)h * hs;
    float* Qs = smem;
    float* dOs = Qs + bt * ld;
    float* Ks = dOs + bt * ld;
    float* Vs = Ks + bt * ld;
    float* dSs = Vs + bt * ld;
    float* Ls = dSs + bt * lds;
    float* Ds = Ls + bt;

    fa_load_tile(Qs, ld, qb, c3, q0, bt, T, hs);
    fa_load_tile(dOs, ld, gb, C, q0, bt, T, hs);
    fa_load_rows(Ls, Ds, lse, dvec, bh, q0, bt, T);
    float dq[FA_MAX_ROWS][FA_DCHUNKS];
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++)
#pragma unroll
        for (int j = 0; j < FA_DCHUNKS; j++) dq[i][j] = 0.0f;
    const int kend = min(T, q0 + bt);
    for (int k0 = 0; k0 < kend; k0 += bt) {
        __syncthreads();
        fa_load_tile(Ks, ld, qb + C, c3, k0, bt, T, hs);
        fa_load_tile(Vs, ld, qb + 2 * C, c3, k0, bt, T, hs);
        __syncthreads();
        for (int i = threadIdx.x; i < bt * bt; i += FA_THREADS) {
            int r = i / bt, c = i - r * bt;
            float p, ds;
            fa_p_ds(Qs, dOs, Ks, Vs, Ls, Ds, ld, hs, r, c, q0 + r, k0 + c, T, scale, &p, &ds);
            dSs[r * lds + c] = ds;
        }
        __syncthreads();
        // dq += dS K: query rows warp + 8*i, columns lane + 32*j.
#pragma unroll
        for (int i = 0; i < FA_MAX_ROWS; i++) {
            int r = warp + 8 * i;
            if (r < bt) {
                for (int c = 0; c < bt; c++) {
                    float ds = dSs[r * lds + c];
#pragma unroll
                    for (int j = 0; j < FA_DCHUNKS; j++) {
                        int d = lane + 32 * j;
                        if (d < hs) dq[i][j] += ds * Ks[c * ld + d];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < FA_MAX_ROWS; i++) {
        int r = warp + 8 * i, t = q0 + r;
        if (r < bt && t < T) {
            float* out = dqkv + ((long long)b * T + t) * c3 + (long long)h * hs;
#pragma unroll
            for (int j = 0; j < FA_DCHUNKS; j++) {
                int d = lane + 32 * j;
                if (d < hs) out[d] = dq[i][j] * scale;
            }
        }
    }
}
#endif  // KERNEL_IN_PART(0)

// --------------------------------------------------------------------------- forward bf16
//
// Tensor-core forward: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA,
// "Warp-level matrix multiply-accumulate instructions", sm_80+): D (16x8, f32) =
// A (16x16, bf16, row) * B (16x8, bf16, col) + C. Fragment layouts, from the ISA's
// "Matrix fragments for mma.m16n8k16 with floating point type", with
// g = laneid >> 2 (groupID) and q = laneid & 3 (threadID_in_group):
//   A: four .b32 registers of two bf16 each (element with the lower column in the low
//      16 bits): a0 = A[g][2q, 2q+1], a1 = A[g+8][2q, 2q+1], a2 = A[g][2q+8, 2q+9],
//      a3 = A[g+8][2q+8, 2q+9].
//   B: two .b32 registers: b0 = B[2q, 2q+1][g] (rows k = 2q and 2q+1 of column n = g),
//      b1 = B[2q+8, 2q+9][g].
//   C, D: four f32: c0 = C[g][2q], c1 = C[g][2q+1], c2 = C[g+8][2q], c3 = C[g+8][2q+1].
//
// S = Q K^T: A = a 16-row slice of Q (k along the head dimension), B[k][n] = K[n][k], so
// b0 is the pair K[n0+g][k0+2q, +1], contiguous in a row-major K tile. O += P V: A = P,
// taken straight from the S accumulators (the C layout of two adjacent n-tiles is the A
// layout of one 16-wide k chunk: a0 = S[2kc].c0,c1, a1 = S[2kc].c2,c3, a2 = S[2kc+1].c0,c1,
// a3 = S[2kc+1].c2,c3), and B[k][n] = V[key k][d n]: the V tile is row-major too, and b0,
// the pair V[kk+2q, +1][d0+g] of one column, comes from ldmatrix.trans (fa_mma_xb, which
// also serves the backward's products by row-major tiles). Each warp owns 16 query rows; each
// lane holds rows g and g+8 of them, so row max and row sum reduce over the 4 lanes of a
// group (shuffles with xor 1 and 2). Inputs are rounded to bf16 (nearest even) when tiles
// are loaded; scores, softmax, P's row sums and O stay fp32 (P is rounded to bf16 only as
// the A operand of P V).

#define FB_WARPS 8                 // warps per forward block, 16 query rows each
#define FB_ROWS (16 * FB_WARPS)    // query rows per forward block: 128
#define FB_THREADS (32 * FB_WARPS)
#define FB_KEYS 64                 // keys per tile
#define FB_KPAD 8    // bf16 padding per shared row (conflict-free fragment loads)

#ifndef FA_STATIC_SHARED
#define FA_STATIC_SHARED __shared__
#endif

// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN).
__device__ __forceinline__ unsigned short fa_f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Two values as bf16 bits in one word (lo in the low half), each rounded to nearest even:
// one cvt.rn.bf16x2.f32 on sm_80+ (PTX: the first source goes to the upper half), which
// gives fa_f2bf's bits for every value but NaN (a NaN stays a NaN, with another payload);
// fa_f2bf's six integer instructions per value elsewhere (and in the CPU emulators).
__device__ __forceinline__ unsigned fa_pack_bf16(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned)fa_f2bf(lo) | ((unsigned)fa_f2bf(hi) << 16);
#endif
}

__device__ __forceinline__ unsigned fa_ld32(const unsigned short* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

// The bf16 kernels' storage types: fp32 (rounded to bf16 as tiles are loaded, fa_issue8) or
// bf16 bits (the bf16 mode's attention storage, taken as they are). fa_float_of gives a
// stored value in fp32, fa_put2 stores two adjacent outputs (rounded to nearest even for
// bf16: one 4-byte store, so the element index must be even).
__device__ __forceinline__ float fa_float_of(float x) { return x; }
__device__ __forceinline__ float fa_float_of(unsigned short x) {
    return __uint_as_float((unsigned)x << 16);
}
__device__ __forceinline__ void fa_put2(float* p, float lo, float hi) {
    p[0] = lo;
    p[1] = hi;
}
__device__ __forceinline__ void fa_put2(unsigned short* p, float lo, float hi) {
    *reinterpret_cast<unsigned*>(p) = fa_pack_bf16(lo, hi);
}

// --------------------------------------------------------------------------- backward D

// D_i = y_i . dy_i per (row, head): one warp per row, lanes over the head dimension.
template <class S>
__device__ __forceinline__ void fa_bwd_dot(const S* __restrict__ y, const S* __restrict__ dy,
                                           float* __restrict__ dvec, int B, int T, int C,
                                           int NH) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long long rows = (long long)B * NH * T;
    if (row >= rows) return;
    const int hs = C / NH;
    const int t = (int)(row % T);
    const long long bh = row / T;
    const int h = (int)(bh % NH);
    const long long b = bh / NH;
    const long long off = (b * T + t) * C + (long long)h * hs;
    float s = 0.0f;
    for (int d = lane; d < hs; d += 32) s += fa_float_of(y[off + d]) * fa_float_of(dy[off + d]);
    s = fa_warp_sum(s);
    if (lane == 0) dvec[row] = s;
}

#if KERNEL_IN_PART(0)
extern "C" __global__ void flash_attn_bwd_dot(const float* __restrict__ y,
                                              const float* __restrict__ dy,
                                              float* __restrict__ dvec, int B, int T, int C,
                                              int NH) {
    fa_bwd_dot(y, dy, dvec, B, T, C, NH);
}

extern "C" __global__ void flash_attn_bwd_dot_bf16(const unsigned short* __restrict__ y,
                                                   const unsigned short* __restrict__ dy,
                                                   float* __restrict__ dvec, int B, int T,
                                                   int C, int NH) {
    fa_bwd_dot(y, dy, dvec, B, T, C, NH);
}
#endif  // KERNEL_IN_PART(0)

#ifdef __CUDA_ARCH__
__device__ __forceinline__ void fa_mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2,
                                            unsigned a3, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#endif

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix", sm_75+): four 8 x 8 bf16 matrices from shared memory, each row
// 16 contiguous bytes (16-byte aligned) whose address lane 8i + r gives for row r of matrix
// i; with .trans, lane l receives in r[i] the elements (row 2q, column g) and (row 2q + 1,
// column g) of matrix i (g = l >> 2, q = l & 3; the lower row in the low 16 bits).
// That is the B fragment of mma.m16n8k16 for B[k][n] = R[k][n] stored row-major, k along
// rows: [fa_mma_xb] reads the K, Q, dY and V tiles it multiplies by this way, so no tile is
// ever stored transposed.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void fa_ldsm_x4_trans(unsigned (&r)[4], const unsigned short* row) {
    unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
#endif

// cp.async (PTX ISA, "Data movement and conversion instructions: cp.async", sm_80+): a copy
// from global to shared memory that goes around the registers and proceeds while the
// issuing thread runs on, so a tile's loads overlap the products of the tile before it.
//   fa_cp_async16(dst, src, valid)  16 bytes (.cg: cached in L2 only); src and dst 16-byte
//                                   aligned. valid false: nothing is read (src-size 0) and
//                                   dst is zero-filled; src must still be a valid address.
//   fa_cp_async4(dst, src, valid)   the same for 4 bytes (.ca), 4-byte aligned.
//   fa_cp_commit()                  closes this thread's group of copies issued since the
//                                   last commit.
//   fa_cp_wait<N>()                 waits until at most N of this thread's committed groups
//                                   are in flight.
// A copy is this thread's until it waits for it: other threads may read its bytes only
// after the issuer's wait and a __syncthreads() after that. Each asm is a compiler memory
// barrier ("memory"), so no shared access moves across it.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void fa_cp_async16(void* dst, const void* src, bool valid) {
    unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(d), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void fa_cp_async4(void* dst, const void* src, bool valid) {
    unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :
                 : "r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void fa_cp_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void fa_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// The bf16 kernels' exponentials, in base 2 on the multiprocessor's special-function unit
// (ex2.approx.ftz: relative error ~2^-22, 2^-inf = 0, results below 2^-126 flushed to 0),
// FlashAttention-2's recipe: the accurate expf wraps that same ex2 in eight more
// instructions (its PTX under NVRTC 13: range reduction by three fused multiply-adds, a
// saturation, an exponent shift and a final multiply), and at head size 64 the softmax's
// instructions, not the tensor cores, set the pace.
// - The forward keeps its running max in base-2 units (m2 = scale log2 e max S), so a
//   probability is one fused multiply-add and one ex2: fa_exp2(fmaf(s, scale * FA_LOG2E,
//   -m2)). Its lse is written in natural units.
// - The backward recomputes P = exp(scale s - lse) as fa_exp2(fmaf(s, scale, -lse) *
//   FA_LOG2E): one rounding of the argument before the change of base, so P tracks the
//   exact value as closely as expf did (tools/flash_emulate's check of the backward against
//   a float64 model of the kernels' rounding: worst 1.0e-4, bound 2e-3); taking log2 e into
//   both terms first rounded each, and flipped ten times more P and dS to the neighbouring
//   bf16 value.
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
#endif

// The exponentials' base, a template parameter of the bf16 kernels (EXP2): FaExp<true> is
// the above; FaExp<false> (the _expf kernels, for the flash_exp2 switch) is the accurate
// expf in natural units. A kernel scales scores by
// `scale * unit` into the base's units, takes `exp` of them, and turns the forward's max
// back into natural units for lse with `to_natural`: with FaExp<false> both factors are 1
// and every product with them is exact, so the kernels compute expf(fmaf(s, scale, -m))
// and lse = m + log(l) directly.
template <bool EXP2>
struct FaExp;
template <>
struct FaExp<true> {
    static constexpr float unit = FA_LOG2E;
    static constexpr float to_natural = FA_LN2;
    static __device__ __forceinline__ float exp(float x) { return fa_exp2(x); }
};
template <>
struct FaExp<false> {
    static constexpr float unit = 1.0f;
    static constexpr float to_natural = 1.0f;
    static __device__ __forceinline__ float exp(float x) { return expf(x); }
};

// out (16 x hs, hs/8 n-tiles) += X B where X (16 x 16*KC) is given as the C-layout
// accumulators x[2*KC][4] of a product (rounded to bf16 here: two adjacent n-tiles are the
// A fragment of one 16-wide k chunk) and B[k][n] = R[k][n], R row-major (16*KC rows, ld
// bf16 apart, 16-byte-aligned rows). The B fragments come from fa_ldsm_x4_trans: for the
// 16-row chunk kk and columns d0 = 8*dt, matrices (rows kk.., columns d0..), (kk+8.., d0..),
// (kk.., d0+8..), (kk+8.., d0+8..) are b0 and b1 of n-tile dt and of n-tile dt + 1 (hs is a
// multiple of 16). Each out[dt] adds the k chunks in order.
template <int KC, int HM>
__device__ __forceinline__ void fa_mma_xb(float (*out)[4], const float (*x)[4],
                                          const unsigned short* R, int ld, int hs) {
    const int lane = threadIdx.x & 31;
    // The row this lane addresses: matrix lane >> 3, its row lane & 7.
    const int mrow = (lane & 7) + ((lane >> 3) & 1) * 8, mcol = (lane >> 4) * 8;
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        unsigned a0 = fa_pack_bf16(x[2 * kc][0], x[2 * kc][1]);
        unsigned a1 = fa_pack_bf16(x[2 * kc][2], x[2 * kc][3]);
        unsigned a2 = fa_pack_bf16(x[2 * kc + 1][0], x[2 * kc + 1][1]);
        unsigned a3 = fa_pack_bf16(x[2 * kc + 1][2], x[2 * kc + 1][3]);
#pragma unroll
        for (int dt = 0; dt < HM / 8; dt += 2) {
            if (dt * 8 < hs) {
                unsigned b[4];
                fa_ldsm_x4_trans(b, R + (kc * 16 + mrow) * ld + dt * 8 + mcol);
                fa_mma_bf16(out[dt], a0, a1, a2, a3, b[0], b[1]);
                fa_mma_bf16(out[dt + 1], a0, a1, a2, a3, b[2], b[3]);
            }
        }
    }
}

// Vector accesses are marked as in kernels/common.cuh (alignment checked by the CPU
// emulators, nothing on the GPU).
#ifndef VEC_ACCESS
#define VEC_ACCESS(p, bytes)
#endif

// One group of eight consecutive values of a tile row, to dst (16-byte aligned) as bf16
// bits; valid false: zeros (src unread, but a valid address). bf16 storage: one 16-byte
// cp.async, left in flight (the caller commits and waits), or with ASYNC false one 16-byte
// load and store, done when this returns. fp32 storage (ASYNC has no effect): two 16-byte
// loads rounded to nearest even and one 16-byte shared store, done when this returns.
template <bool ASYNC>
__device__ __forceinline__ void fa_issue8(unsigned short* dst, const unsigned short* src,
                                          bool valid) {
    VEC_ACCESS(dst, 16);
    if (ASYNC) {
        VEC_ACCESS(src, 16);
        fa_cp_async16(dst, src, valid);
        return;
    }
    uint4 t;
    t.x = t.y = t.z = t.w = 0u;
    if (valid) {
        VEC_ACCESS(src, 16);
        t = *reinterpret_cast<const uint4*>(src);
    }
    *reinterpret_cast<uint4*>(dst) = t;
}
template <bool ASYNC>
__device__ __forceinline__ void fa_issue8(unsigned short* dst, const float* src, bool valid) {
    uint4 packed;
    packed.x = packed.y = packed.z = packed.w = 0u;
    if (valid) {
        VEC_ACCESS(src, 16);
        VEC_ACCESS(src + 4, 16);
        float4 a = *reinterpret_cast<const float4*>(src);
        float4 b = *reinterpret_cast<const float4*>(src + 4);
        packed.x = fa_pack_bf16(a.x, a.y);
        packed.y = fa_pack_bf16(a.z, a.w);
        packed.z = fa_pack_bf16(b.x, b.y);
        packed.w = fa_pack_bf16(b.z, b.w);
    }
    VEC_ACCESS(dst, 16);
    *reinterpret_cast<uint4*>(dst) = packed;
}

// Issues the loads of rows [r0, r0 + rows) of one head's hs columns (src: row 0, column
// h*hs of its third; rows ld_src values apart; fp32, or bf16 taken as is) into
// dst[r * ld + d] as bf16; rows >= T become zeros. With bf16 storage the copies are
// cp.async, in flight until the caller's fa_cp_commit and fa_cp_wait; with fp32 storage
// they are synchronous (rounded on the way), and the same commit and wait cost nothing, so
// both storages run one schedule. ASYNC false (the flash_async switch off): synchronous
// loads for bf16 storage too. Every thread of the block (THREADS of them) takes groups of
// 8 columns; consecutive threads take consecutive groups of a row (each warp reads whole
// 128-byte rows of global memory; every quarter-warp's 16-byte stores cover the 32 banks
// once). Needs hs % 8 == 0 (the bf16 kernels take multiples of 16), src and ld_src such
// that every row start is 16-byte aligned (flash.rs checks the buffers), and dst rows
// 16-byte aligned (ld a multiple of 8, the tile arrays __align__(16)). Tiles are only ever
// stored row-major: products that need one transposed read it with ldmatrix.trans
// (fa_mma_xb).
template <int THREADS, bool ASYNC, class S>
__device__ __forceinline__ void fa_issue_tile(unsigned short* dst, int ld, const S* src,
                                              long long ld_src, int r0, int rows, int T,
                                              int hs) {
    const int groups = hs / 8;
    for (int i = threadIdx.x; i < rows * groups; i += THREADS) {
        int r = i / groups, d = (i - r * groups) * 8, t = r0 + r;
        bool valid = t < T;
        fa_issue8<ASYNC>(dst + r * ld + d, src + (long long)(valid ? t : 0) * ld_src + d,
                         valid);
    }
}

// Issues the copies of lse and D of rows [r0, r0 + rows) of head bh into Ls, Ds (zeros
// past T): cp.async, or synchronous loads with ASYNC false.
template <bool ASYNC>
__device__ __forceinline__ void fa_issue_rows(float* Ls, float* Ds, const float* lse,
                                              const float* dvec, long long bh, int r0,
                                              int rows, int T) {
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        int t = r0 + r;
        bool valid = t < T;
        long long i = bh * T + (valid ? t : 0);
        if (ASYNC) {
            fa_cp_async4(Ls + r, lse + i, valid);
            fa_cp_async4(Ds + r, dvec + i, valid);
        } else {
            Ls[r] = valid ? lse[i] : 0.0f;
            Ds[r] = valid ? dvec[i] : 0.0f;
        }
    }
}

// The forward for qkv and y of storage type S (float or bf16 bits; see fa_bf16_of), head
// size HS (0: any multiple of 16 up to HM, C / NH; see "Head size" above), tile loads by
// cp.async (ASYNC; see "Tile loads" above) and exponentials in base 2 (EXP2, see FaExp).
template <class S, int HS, bool ASYNC, bool EXP2>
__device__ __forceinline__ void fa_fwd_bf16(const S* __restrict__ qkv, S* __restrict__ y,
                                            float* __restrict__ lse, int T, int C, int NH,
                                            float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    // The K tile, then the V tile, row-major, bf16 bits; the block's Q rows are staged
    // through the same bytes first.
    constexpr int HM = HS ? HS : FA_MAX_HS;
    static_assert(FB_ROWS <= 2 * FB_KEYS, "Q is staged in the K and V tiles");
    FA_STATIC_SHARED __align__(16) unsigned short KVs[2 * FB_KEYS * (HM + FB_KPAD)];
    const int hs = HS ? HS : C / NH, ldk = hs + FB_KPAD;
    unsigned short* Ks = KVs;
    unsigned short* Vs = KVs + FB_KEYS * ldk;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FB_ROWS;
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const S* qb = qkv + (long long)b * T * c3 + (long long)h * hs;

    // Q fragments (A operand of S = Q K^T), kept in registers for the whole block.
    fa_issue_tile<FB_THREADS, ASYNC>(KVs, ldk, qb, c3, q0, FB_ROWS, T, hs);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    unsigned qf[HM / 16][4];
    const int wr = warp * 16;  // this warp's first row in the tile
#pragma unroll
    for (int kc = 0; kc < HM / 16; kc++) {
        if (kc * 16 < hs) {
            const unsigned short* p = KVs + (wr + g) * ldk + kc * 16 + 2 * q;
            qf[kc][0] = fa_ld32(p);
            qf[kc][1] = fa_ld32(p + 8 * ldk);
            qf[kc][2] = fa_ld32(p + 8);
            qf[kc][3] = fa_ld32(p + 8 * ldk + 8);
        }
    }
    __syncthreads();  // every warp has its Q fragments: the bytes become the K and V tiles
    fa_issue_tile<FB_THREADS, ASYNC>(Ks, ldk, qb + C, c3, 0, FB_KEYS, T, hs);
    fa_cp_commit();
    float o[HM / 8][4];
#pragma unroll
    for (int dt = 0; dt < HM / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[dt][e] = 0.0f;
    // Running max (in the base's units, see FaExp: scale log2 e times the largest score in
    // base 2) and sum of rows g and g+8 of this warp's slice.
    using E = FaExp<EXP2>;
    float m[2] = {fa_neg_inf(), fa_neg_inf()}, l[2] = {0.0f, 0.0f};
    const float scale_units = scale * E::unit;  // scores into the base's units
    int qrow[2];
    qrow[0] = min(q0 + wr + g, T - 1);  // rows past T take row T-1's mask (never written)
    qrow[1] = min(q0 + wr + g + 8, T - 1);

    // Each key tile: the V tile's copies run while S = Q K^T and the softmax do, and the
    // next K tile's while P V does (with bf16 storage; fp32 storage loads synchronously in
    // the same places). A warp whose 16 rows see no key of a tile (above the diagonal: the
    // block's first warps, on its last tiles) takes part in the loads and barriers only.
    const int kend = min(T, q0 + FB_ROWS);
    const int last_row = q0 + wr + 15;  // this warp's last query row
    for (int k0 = 0; k0 < kend; k0 += FB_KEYS) {
        fa_cp_wait<0>();  // this thread's copies of the K tile
        __syncthreads();  // the K tile complete; every warp done with Vs (the last P V)
        fa_issue_tile<FB_THREADS, ASYNC>(Vs, ldk, qb + 2 * C, c3, k0, FB_KEYS, T, hs);
        fa_cp_commit();
        const bool sees = k0 <= last_row;  // the same for every lane of the warp
        float s[FB_KEYS / 8][4];  // S, then P (16 x 64 per warp)
        if (sees) {
            // S = Q K^T: 8 n-tiles of 8 keys.
#pragma unroll
            for (int nt = 0; nt < FB_KEYS / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) s[nt][e] = 0.0f;
#pragma unroll
                for (int kc = 0; kc < HM / 16; kc++) {
                    if (kc * 16 < hs) {
                        const unsigned short* p = Ks + (nt * 8 + g) * ldk + kc * 16 + 2 * q;
                        fa_mma_bf16(s[nt], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3],
                                    fa_ld32(p), fa_ld32(p + 8));
                    }
                }
            }
            // Mask (element e is row g + 8*(e>>1), key 2q + (e&1)) where the tile has a key
            // past some row of this warp (the diagonal tile; keys past T), online softmax.
            const bool unmasked = k0 + FB_KEYS - 1 <= min(q0 + wr, T - 1);
            float mx[2] = {fa_neg_inf(), fa_neg_inf()};
#pragma unroll
            for (int nt = 0; nt < FB_KEYS / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int kj = k0 + nt * 8 + 2 * q + (e & 1);
                    if (!unmasked && kj > qrow[e >> 1]) s[nt][e] = fa_neg_inf();
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
                }
            float alpha[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                // Finite: key 0 is in the first tile. scale > 0, so the largest scaled
                // score is the largest score scaled.
                float m_new = fmaxf(m[r], mx[r] * scale_units);
                alpha[r] = E::exp(m[r] - m_new);  // 0 on the first tile (m = -inf)
                m[r] = m_new;
            }
#pragma unroll
            for (int nt = 0; nt < FB_KEYS / 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float p = E::exp(fmaf(s[nt][e], scale_units, -m[e >> 1]));  // 0 if masked
                    s[nt][e] = p;
                    sum[e >> 1] += p;
                }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
                sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
                l[r] = l[r] * alpha[r] + sum[r];
            }
#pragma unroll
            for (int dt = 0; dt < HM / 8; dt++) {
                o[dt][0] *= alpha[0];
                o[dt][1] *= alpha[0];
                o[dt][2] *= alpha[1];
                o[dt][3] *= alpha[1];
            }
        }
        fa_cp_wait<0>();  // this thread's copies of the V tile
        __syncthreads();  // the V tile complete; every warp done with Ks
        if (k0 + FB_KEYS < kend) {
            fa_issue_tile<FB_THREADS, ASYNC>(Ks, ldk, qb + C, c3, k0 + FB_KEYS, FB_KEYS, T, hs);
            fa_cp_commit();
        }
        // O += P V: 4 chunks of 16 keys, hs/8 n-tiles of the head dimension.
        if (sees) fa_mma_xb<FB_KEYS / 16, HM>(o, s, Vs, ldk, hs);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = q0 + wr + g + 8 * r;
        if (t < T) {
            float inv = 1.0f / l[r];
            S* yr = y + ((long long)b * T + t) * C + (long long)h * hs;
#pragma unroll
            for (int dt = 0; dt < HM / 8; dt++) {
                if (dt * 8 < hs)
                    fa_put2(yr + dt * 8 + 2 * q, o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            }
            if (q == 0) lse[((long long)b * NH + h) * T + t] = m[r] * E::to_natural + logf(l[r]);
        }
    }
#endif
}

// --------------------------------------------------------------------------- backward bf16
//
// Tensor-core backward, flash-attention-2 style: the same contract as the fp32 backward
// kernels (inputs qkv, dy, lse, dvec from flash_attn_bwd_dot; dqkv fully overwritten for
// the first T rows, each element written once, no atomics, deterministic) with the four
// products on mma.sync m16n8k16 (bf16 operands, fp32 accumulation; fragment layouts as
// documented above the forward):
//   S = Q K^T (recomputed), dP = dY V^T, dV += P^T dY, dK += dS^T Q  (flash_attn_bwd_dkdv_bf16)
//   S = Q K^T, dP = dY V^T, dQ += dS K                               (flash_attn_bwd_dq_bf16)
// q, k, v and dy are rounded to bf16 (nearest even) when tiles are loaded; the
// probabilities P = exp(scale * S - lse) and dS = P * (dP - D) are computed in fp32 from
// the fp32 accumulators, and rounded to bf16 only as the A operand of the next product.
// lse must come from the bf16 forward (it recomputes S from the same bf16 q and k, so the
// recomputed rows of P sum to 1 up to fp32 rounding). Needs sm_80+, hs a multiple of 16,
// at most 128. 128 threads (4 warps; dq: 256, 8 warps), static shared memory only (no
// dynamic).
//
// Both write dq | dk | dv to dqkv in fp32, or, when dqkv_bf16 is not null (dqkv then
// unused), to dqkv_bf16 in bf16 (the same fp32 values rounded to nearest even, two adjacent
// elements per 4-byte store): the bf16 mode's qkv backward products read them in bf16.
//
// flash_attn_bwd_dkdv_bf16(qkv, dy, lse, dvec, dqkv, dqkv_bf16, T, C, NH, scale)
//   Block: FBB_KROWS = 64 keys (16 per warp), grid (ceil(T / 64), NH, B); loops over query
//   tiles of FBB_QCOLS = 32 from the block's first key to T. Each warp computes the
//   transposed products with its keys as the M rows:
//     S^T (16 x 32) = K Q^T:  A = K rows (registers, loaded once), B[k][n] = Q[n][k]: Qs
//                             row-major, b0 = Qs[n0+g][k0+2q, +1].
//     dP^T (16 x 32) = V dY^T: A = V rows (registers), B from dYs row-major, the same way.
//     P^T = exp(scale * S^T - lse[query]), dS^T = P^T * (dP^T - D[query]); zero where
//       masked (key > query, or query >= T).
//     dV (16 x hs) += P^T dY: A = P^T taken from the S^T accumulators (the C layout of two
//       adjacent n-tiles is the A layout of one 16-wide k chunk, as in the forward),
//       B[k][n] = dY[query k][d n]: from dYs with ldmatrix.trans (fa_mma_xb).
//     dK (16 x hs) += dS^T Q: A = dS^T from the dP^T accumulators, B from Qs the same way.
//       dk is scaled by `scale` when written.
//   Shared (bf16 bits, one static array): two buffers of the query tile (Qs, dYs:
//   32 x (hs + 8) each), then lse and D of each buffer's queries, 32 floats each. The K
//   and V rows (64 x (hs + 8) each) are staged through the bytes of the two buffers before
//   the loop: at hs = 128, 2 * 2 * 64 * 136 + 2 * 2 * 4 * 32 = 35328 bytes.
//
// flash_attn_bwd_dkdv_bf16_io(qkv, dy, lse, dvec, dqkv, T, C, NH, scale) and
// flash_attn_bwd_dq_bf16_io(...): the same kernels with qkv, dy and dqkv all in bf16 (the
// bf16 mode's attention storage; the values are loaded as they are, so the output is the
// fp32-input kernels' bf16 output when their inputs hold the same values).
//
// flash_attn_bwd_dq_bf16(qkv, dy, lse, dvec, dqkv, dqkv_bf16, T, C, NH, scale)
//   Block: FBB_DQ_ROWS = 128 queries (8 warps of 16, 256 threads: each K and V tile loaded
//   serves 128 queries), grid (ceil(T / 128), NH, B); loops over key tiles of FBB_KCOLS =
//   32 up to the diagonal. A warp skips the products of a tile none of its rows sees.
//     S (16 x 32) = Q K^T:  A = Q rows (registers), B from Ks (row-major).
//     dP (16 x 32) = dY V^T: A = dY rows (registers), B from Vs (row-major).
//     dS = P * (dP - D) in fp32 (lse and D of the warp's rows are held in registers).
//     dQ (16 x hs) += dS K: A = dS from the dP accumulators, B[k][n] = K[key k][d n]:
//       from Ks with ldmatrix.trans (fa_mma_xb). dq is scaled when written.
//   Shared (bf16 bits, one static array): two buffers of the key tile (Ks, Vs:
//   32 x (hs + 8) each). The block's Q rows, then its dY rows (128 x (hs + 8) each), are
//   staged through the same bytes before the loop: 128 * 136 * 2 = 34816 bytes at hs = 128.
//
// Row padding of 8 bf16 keeps the fragment loads conflict-free: a row of hs + 8 bf16 is
// (hs + 8) / 2 = 4 * (an odd number) words, so the 8 groups (rows g) x 4 lanes (words q) of
// a fragment load hit 32 distinct banks, and so do the 8 rows of 16 bytes (4 words) of
// each matrix an ldmatrix reads.

#define FBB_THREADS 128
#define FBB_KROWS 64   // keys per dk/dv block (4 warps x 16)
#define FBB_QCOLS 32   // queries per tile of the dk/dv loop
#define FBB_DQ_WARPS 8  // warps per dq block, 16 query rows each
#define FBB_DQ_ROWS (16 * FBB_DQ_WARPS)  // queries per dq block: 128
#define FBB_DQ_THREADS (32 * FBB_DQ_WARPS)
#define FBB_KCOLS 32   // keys per tile of the dq loop
// Shared bytes (see above), at the largest head size.
#define FBB_DKDV_SHORTS(HM) (2 * FBB_KROWS * ((HM) + FB_KPAD))
#define FBB_DQ_SHORTS(HM) (FBB_DQ_ROWS * ((HM) + FB_KPAD))
// One buffer of the loops' tiles: two tiles (Q and dY, or K and V) of 32 rows, ld apart.
// Two buffers take the bytes that stage the block's own 64 rows of two tensors first.
#define FBB_QTILE_SHORTS(ld) (2 * FBB_QCOLS * (ld))
static_assert(4 * FBB_QCOLS == 2 * FBB_KROWS && 4 * FBB_KCOLS == FBB_DQ_ROWS,
              "two tile buffers fill the staging bytes");

// The A fragments of the 16 rows [r0, r0 + 16) of a row-major bf16 tile (ld bf16 apart),
// one per 16-wide chunk of the head dimension.
template <int HM>
__device__ __forceinline__ void fa_load_afrag(unsigned (*f)[4], const unsigned short* tile,
                                              int ld, int r0, int hs) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int kc = 0; kc < HM / 16; kc++) {
        if (kc * 16 < hs) {
            const unsigned short* p = tile + (r0 + g) * ld + kc * 16 + 2 * q;
            f[kc][0] = fa_ld32(p);
            f[kc][1] = fa_ld32(p + 8 * ld);
            f[kc][2] = fa_ld32(p + 8);
            f[kc][3] = fa_ld32(p + 8 * ld + 8);
        }
    }
}

// acc[nt] (16 x 8 per n-tile, 4 n-tiles: 16 x 32) = A B with A the 16 x hs fragments `a`
// and B[k][n] = tile[n][k] (tile row-major, ld bf16 apart): the C layout of A tile^T.
template <int HM>
__device__ __forceinline__ void fa_mma_abt(float (*acc)[4], const unsigned (*a)[4],
                                           const unsigned short* tile, int ld, int hs) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int nt = 0; nt < 4; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) acc[nt][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < HM / 16; kc++) {
            if (kc * 16 < hs) {
                const unsigned short* p = tile + (nt * 8 + g) * ld + kc * 16 + 2 * q;
                fa_mma_bf16(acc[nt], a[kc][0], a[kc][1], a[kc][2], a[kc][3], fa_ld32(p),
                            fa_ld32(p + 8));
            }
        }
    }
}

// Writes the 16 x hs C-layout accumulators `acc` (rows r0 + g, r0 + g + 8), times `mul`,
// to out[t * ld_out + d] for rows t < T.
// Rows of an accumulator tile times `mul`, to out (fp32) or, when out_bf16 is not null, to
// out_bf16 (bf16, the same values rounded; a pair of adjacent elements is one 4-byte store:
// ld_out and the column offsets are even). Both point at the tile's row 0, column 0.
template <int HM>
__device__ __forceinline__ void fa_store_rows(float* out, unsigned short* out_bf16,
                                              long long ld_out, const float (*acc)[4],
                                              float mul, int r0, int T, int hs) {
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int t = r0 + g + 8 * r;
        if (t < T) {
#pragma unroll
            for (int dt = 0; dt < HM / 8; dt++) {
                if (dt * 8 < hs) {
                    float lo = acc[dt][2 * r] * mul, hi = acc[dt][2 * r + 1] * mul;
                    long long i = (long long)t * ld_out + dt * 8 + 2 * q;
                    if (out_bf16) {
                        *reinterpret_cast<unsigned*>(out_bf16 + i) = fa_pack_bf16(lo, hi);
                    } else {
                        out[i] = lo;
                        out[i + 1] = hi;
                    }
                }
            }
        }
    }
}

// Issues the copies of the dk/dv kernel's query tile [q0, q0 + FBB_QCOLS) into buffer
// `buf`: the Q and dY tiles at sm + buf * FBB_QTILE_SHORTS(ld), its lse and D at
// LDs + buf * 2 * FBB_QCOLS.
template <bool ASYNC, class S>
__device__ __forceinline__ void fa_issue_query_tile(unsigned short* sm, int ld, float* LDs,
                                                    const S* qb, const S* gb,
                                                    const float* lse, const float* dvec,
                                                    long long bh, long long c3, int C, int q0,
                                                    int buf, int T, int hs) {
    unsigned short* Qs = sm + buf * FBB_QTILE_SHORTS(ld);
    fa_issue_tile<FBB_THREADS, ASYNC>(Qs, ld, qb, c3, q0, FBB_QCOLS, T, hs);
    fa_issue_tile<FBB_THREADS, ASYNC>(Qs + FBB_QCOLS * ld, ld, gb, (long long)C, q0, FBB_QCOLS, T,
                                      hs);
    float* Ls = LDs + buf * 2 * FBB_QCOLS;
    fa_issue_rows<ASYNC>(Ls, Ls + FBB_QCOLS, lse, dvec, bh, q0, FBB_QCOLS, T);
}

// The dk/dv kernel for qkv and dy of storage type S (float or bf16 bits), head size HS
// (0: any, C / NH), tile loads by cp.async (ASYNC) and exponentials in base 2 (EXP2, see
// FaExp).
template <class S, int HS, bool ASYNC, bool EXP2>
__device__ __forceinline__ void fa_bwd_dkdv_bf16(const S* __restrict__ qkv,
                                                 const S* __restrict__ dy,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ dvec,
                                                 float* __restrict__ dqkv,
                                                 unsigned short* __restrict__ dqkv_bf16, int T,
                                                 int C, int NH, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr int HM = HS ? HS : FA_MAX_HS;
    using E = FaExp<EXP2>;  // the exponentials' base
    FA_STATIC_SHARED __align__(16) unsigned short sm[FBB_DKDV_SHORTS(HM) + 8 * FBB_QCOLS];
    const int hs = HS ? HS : C / NH, ld = hs + FB_KPAD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int k0 = blockIdx.x * FBB_KROWS;  // the first key tiles see the most queries
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const long long bh = (long long)b * NH + h;
    const S* qb = qkv + (long long)b * T * c3 + (long long)h * hs;
    const S* gb = dy + (long long)b * T * C + (long long)h * hs;
    // Query tile buffer `buf` (0, 1): Qs, then dYs (FBB_QCOLS x ld each) from
    // sm + buf * FBB_QTILE_SHORTS(ld); its lse and D after the tiles.
    float* LDs = reinterpret_cast<float*>(sm + FBB_DKDV_SHORTS(HM));

    // K and V rows of this block, staged in the tile bytes, into A fragments.
    fa_issue_tile<FBB_THREADS, ASYNC>(sm, ld, qb + C, c3, k0, FBB_KROWS, T, hs);
    fa_issue_tile<FBB_THREADS, ASYNC>(sm + FBB_KROWS * ld, ld, qb + 2 * C, c3, k0, FBB_KROWS, T,
                                      hs);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    unsigned kf[HM / 16][4], vf[HM / 16][4];
    const int wr = warp * 16;  // this warp's first key row in the block
    fa_load_afrag<HM>(kf, sm, ld, wr, hs);
    fa_load_afrag<HM>(vf, sm + FBB_KROWS * ld, ld, wr, hs);
    __syncthreads();  // every warp has its fragments: the staging bytes become the buffers
    float dk[HM / 8][4], dv[HM / 8][4];
#pragma unroll
    for (int dt = 0; dt < HM / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            dk[dt][e] = 0.0f;
            dv[dt][e] = 0.0f;
        }
    const int krow[2] = {k0 + wr + g, k0 + wr + g + 8};

    // Queries i >= k0 can see this block's keys. Each query tile's copies (Q, dY, lse, D)
    // run while the products of the tile before it do, in the other buffer.
    fa_issue_query_tile<ASYNC>(sm, ld, LDs, qb, gb, lse, dvec, bh, c3, C, k0, 0, T, hs);
    fa_cp_commit();
    for (int q0 = k0, buf = 0; q0 < T; q0 += FBB_QCOLS, buf ^= 1) {
        fa_cp_wait<0>();  // this thread's copies of this tile
        __syncthreads();  // the tile complete; every warp done with the other buffer
        if (q0 + FBB_QCOLS < T) {
            fa_issue_query_tile<ASYNC>(sm, ld, LDs, qb, gb, lse, dvec, bh, c3, C,
                                       q0 + FBB_QCOLS, buf ^ 1, T, hs);
            fa_cp_commit();
        }
        const unsigned short* Qs = sm + buf * FBB_QTILE_SHORTS(ld);
        const unsigned short* dYs = Qs + FBB_QCOLS * ld;
        const float* Ls = LDs + buf * 2 * FBB_QCOLS;
        const float* Ds = Ls + FBB_QCOLS;
        float st[4][4], dpt[4][4];  // S^T, then P^T; dP^T, then dS^T (16 keys x 32 queries)
        fa_mma_abt<HM>(st, kf, Qs, ld, hs);
        fa_mma_abt<HM>(dpt, vf, dYs, ld, hs);
        // Element e: key row g + 8*(e>>1), query column nt*8 + 2q + (e&1). No mask where
        // every query of the tile sees every key of this warp (below the diagonal, not past T).
        const bool unmasked = q0 >= k0 + wr + 15 && q0 + FBB_QCOLS <= T;
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = nt * 8 + 2 * q + (e & 1), qi = q0 + c;
                float p = 0.0f, ds = 0.0f;
                if (unmasked || (qi < T && krow[e >> 1] <= qi)) {
                    p = E::exp(fmaf(st[nt][e], scale, -Ls[c]) * E::unit);
                    ds = p * (dpt[nt][e] - Ds[c]);
                }
                st[nt][e] = p;
                dpt[nt][e] = ds;
            }
        fa_mma_xb<FBB_QCOLS / 16, HM>(dv, st, dYs, ld, hs);
        fa_mma_xb<FBB_QCOLS / 16, HM>(dk, dpt, Qs, ld, hs);
    }
    long long base = (long long)b * T * c3 + (long long)h * hs;
    float* out = dqkv_bf16 ? nullptr : dqkv + base;
    unsigned short* outb = dqkv_bf16 ? dqkv_bf16 + base : nullptr;
    fa_store_rows<HM>(out ? out + C : nullptr, outb ? outb + C : nullptr, c3, dk, scale, k0 + wr, T,
                  hs);
    fa_store_rows<HM>(out ? out + 2 * C : nullptr, outb ? outb + 2 * C : nullptr, c3, dv, 1.0f,
                  k0 + wr, T, hs);
#endif
}

// The dq kernel for qkv and dy of storage type S (float or bf16 bits), head size HS (0:
// any, C / NH), tile loads by cp.async (ASYNC) and exponentials in base 2 (EXP2, see
// FaExp).
template <class S, int HS, bool ASYNC, bool EXP2>
__device__ __forceinline__ void fa_bwd_dq_bf16(const S* __restrict__ qkv,
                                               const S* __restrict__ dy,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ dvec,
                                               float* __restrict__ dqkv,
                                               unsigned short* __restrict__ dqkv_bf16, int T,
                                               int C, int NH, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr int HM = HS ? HS : FA_MAX_HS;
    using E = FaExp<EXP2>;  // the exponentials' base
    FA_STATIC_SHARED __align__(16) unsigned short sm[FBB_DQ_SHORTS(HM)];
    const int hs = HS ? HS : C / NH, ld = hs + FB_KPAD;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FBB_DQ_ROWS;  // the last see the most keys
    const int h = blockIdx.y, b = blockIdx.z;
    const long long c3 = 3LL * C;
    const long long bh = (long long)b * NH + h;
    const S* qb = qkv + (long long)b * T * c3 + (long long)h * hs;
    const S* gb = dy + (long long)b * T * C + (long long)h * hs;
    // Key tile buffer `buf` (0, 1): Ks, then Vs (FBB_KCOLS x ld each) from
    // sm + buf * FBB_QTILE_SHORTS(ld).

    // Q, then dY rows of this block, staged in turn in the tile bytes, into A fragments.
    unsigned qf[HM / 16][4], gf[HM / 16][4];
    const int wr = warp * 16;  // this warp's first query row in the block
    fa_issue_tile<FBB_DQ_THREADS, ASYNC>(sm, ld, qb, c3, q0, FBB_DQ_ROWS, T, hs);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<HM>(qf, sm, ld, wr, hs);
    __syncthreads();  // every warp has its Q fragments
    fa_issue_tile<FBB_DQ_THREADS, ASYNC>(sm, ld, gb, (long long)C, q0, FBB_DQ_ROWS, T, hs);
    fa_cp_commit();
    fa_cp_wait<0>();
    __syncthreads();
    fa_load_afrag<HM>(gf, sm, ld, wr, hs);
    __syncthreads();  // every warp has its fragments: the staging bytes become the buffers
    float dq[HM / 8][4];
#pragma unroll
    for (int dt = 0; dt < HM / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) dq[dt][e] = 0.0f;
    int qrow[2];
    float lr[2], dr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        qrow[r] = q0 + wr + g + 8 * r;
        bool in = qrow[r] < T;
        lr[r] = in ? lse[bh * T + qrow[r]] : 0.0f;
        dr[r] = in ? dvec[bh * T + qrow[r]] : 0.0f;
    }

    // Keys [0, kend) can be seen by this block. Each key tile's copies run while the
    // products of the tile before it do, in the other buffer. A warp whose 16 rows see
    // none of a tile's keys (above the diagonal) takes part in the loads and barriers only.
    const int kend = min(T, q0 + FBB_DQ_ROWS);
    const int last_row = q0 + wr + 15;  // this warp's last query row
    fa_issue_tile<FBB_DQ_THREADS, ASYNC>(sm, ld, qb + C, c3, 0, FBB_KCOLS, T, hs);
    fa_issue_tile<FBB_DQ_THREADS, ASYNC>(sm + FBB_KCOLS * ld, ld, qb + 2 * C, c3, 0, FBB_KCOLS,
                                         T, hs);
    fa_cp_commit();
    for (int k0 = 0, buf = 0; k0 < kend; k0 += FBB_KCOLS, buf ^= 1) {
        fa_cp_wait<0>();  // this thread's copies of this tile
        __syncthreads();  // the tile complete; every warp done with the other buffer
        if (k0 + FBB_KCOLS < kend) {
            unsigned short* next = sm + (buf ^ 1) * FBB_QTILE_SHORTS(ld);
            fa_issue_tile<FBB_DQ_THREADS, ASYNC>(next, ld, qb + C, c3, k0 + FBB_KCOLS,
                                                 FBB_KCOLS, T, hs);
            fa_issue_tile<FBB_DQ_THREADS, ASYNC>(next + FBB_KCOLS * ld, ld, qb + 2 * C, c3,
                                                 k0 + FBB_KCOLS, FBB_KCOLS, T, hs);
            fa_cp_commit();
        }
        if (k0 > last_row || q0 + wr >= T) continue;  // the same for every lane of the warp
        const unsigned short* Ks = sm + buf * FBB_QTILE_SHORTS(ld);
        const unsigned short* Vs = Ks + FBB_KCOLS * ld;
        float s[4][4], dp[4][4];  // S; dP, then dS (16 queries x 32 keys)
        fa_mma_abt<HM>(s, qf, Ks, ld, hs);
        fa_mma_abt<HM>(dp, gf, Vs, ld, hs);
        // Element e: query row g + 8*(e>>1), key column nt*8 + 2q + (e&1). No mask where
        // every row of this warp sees every key of the tile (below the diagonal, not past T).
        const bool unmasked = k0 + FBB_KCOLS - 1 <= q0 + wr && last_row < T;
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e >> 1, kj = k0 + nt * 8 + 2 * q + (e & 1);
                float ds = 0.0f;
                if (unmasked || (qrow[r] < T && kj <= qrow[r])) {
                    float p = E::exp(fmaf(s[nt][e], scale, -lr[r]) * E::unit);
                    ds = p * (dp[nt][e] - dr[r]);
                }
                dp[nt][e] = ds;
            }
        fa_mma_xb<FBB_KCOLS / 16, HM>(dq, dp, Ks, ld, hs);
    }
    long long base = (long long)b * T * c3 + (long long)h * hs;
    fa_store_rows<HM>(dqkv_bf16 ? nullptr : dqkv + base, dqkv_bf16 ? dqkv_bf16 + base : nullptr, c3,
                  dq, scale, q0 + wr, T, hs);
#endif
}

// The bf16 kernels' entry points: each a thin wrapper of its template for storage type S
// (float, or bf16 bits for the _io kernels), head size HS (0: any, C / NH; 64: the _hs64
// forms, see "Head size" at the top), tile loads by cp.async (ASYNC; the _io_sync
// kernels load synchronously, for the flash_async switch) and exponentials in base 2
// (EXP2; the _expf kernels take the accurate expf, for the flash_exp2 switch), bounded to
// the block size it is launched with (THREADS: a launch with more threads than its bound
// fails; the engine's test of the compiled kernels checks them against
// src/engine/cuda/flash.rs).
#define FA_FWD_ENTRY(NAME, S, HS, ASYNC, EXP2)                                                 \
    extern "C" __global__ void __launch_bounds__(FB_THREADS)                                   \
        NAME(const S* __restrict__ qkv, S* __restrict__ y, float* __restrict__ lse, int T,     \
             int C, int NH, float scale) {                                                     \
        fa_fwd_bf16<S, HS, ASYNC, EXP2>(qkv, y, lse, T, C, NH, scale);                         \
    }
// fp32 storage: dq | dk | dv to dqkv in fp32, or to dqkv_bf16 when that is not null.
#define FA_BWD_ENTRY(NAME, KERNEL, HS, EXP2, THREADS)                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                      \
        NAME(const float* __restrict__ qkv, const float* __restrict__ dy,                      \
             const float* __restrict__ lse, const float* __restrict__ dvec,                    \
             float* __restrict__ dqkv, unsigned short* __restrict__ dqkv_bf16, int T, int C,   \
             int NH, float scale) {                                                            \
        KERNEL<float, HS, true, EXP2>(qkv, dy, lse, dvec, dqkv, dqkv_bf16, T, C, NH, scale);   \
    }
// bf16 storage: qkv and dy in bf16, dq | dk | dv written in bf16.
#define FA_BWD_IO_ENTRY(NAME, KERNEL, HS, ASYNC, EXP2, THREADS)                                \
    extern "C" __global__ void __launch_bounds__(THREADS)                                      \
        NAME(const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ dy,    \
             const float* __restrict__ lse, const float* __restrict__ dvec,                    \
             unsigned short* __restrict__ dqkv, int T, int C, int NH, float scale) {           \
        KERNEL<unsigned short, HS, ASYNC, EXP2>(qkv, dy, lse, dvec, (float*)nullptr, dqkv, T, \
                                                C, NH, scale);                                 \
    }
// Three groups per head size and base (each one compilation part, see KERNEL_PARTS): fp32
// storage, bf16 storage with cp.async loads, bf16 storage with synchronous loads.
#define FA_BF16_F32_STORAGE_ENTRY_POINTS(SUFFIX, HS, EXP2)                                     \
    FA_FWD_ENTRY(flash_attn_fwd_bf16##SUFFIX, float, HS, true, EXP2)                           \
    FA_BWD_ENTRY(flash_attn_bwd_dkdv_bf16##SUFFIX, fa_bwd_dkdv_bf16, HS, EXP2, FBB_THREADS)    \
    FA_BWD_ENTRY(flash_attn_bwd_dq_bf16##SUFFIX, fa_bwd_dq_bf16, HS, EXP2, FBB_DQ_THREADS)
#define FA_BF16_IO_ENTRY_POINTS(SUFFIX, HS, ASYNC, EXP2)                                       \
    FA_FWD_ENTRY(flash_attn_fwd_bf16_io##SUFFIX, unsigned short, HS, ASYNC, EXP2)              \
    FA_BWD_IO_ENTRY(flash_attn_bwd_dkdv_bf16_io##SUFFIX, fa_bwd_dkdv_bf16, HS, ASYNC, EXP2,    \
                    FBB_THREADS)                                                               \
    FA_BWD_IO_ENTRY(flash_attn_bwd_dq_bf16_io##SUFFIX, fa_bwd_dq_bf16, HS, ASYNC, EXP2,        \
                    FBB_DQ_THREADS)

#if KERNEL_IN_PART(1)
FA_BF16_F32_STORAGE_ENTRY_POINTS(, 0, true)
#endif
#if KERNEL_IN_PART(2)
FA_BF16_IO_ENTRY_POINTS(, 0, true, true)
#endif
#if KERNEL_IN_PART(3)
FA_BF16_IO_ENTRY_POINTS(_sync, 0, false, true)
#endif
#if KERNEL_IN_PART(4)
FA_BF16_F32_STORAGE_ENTRY_POINTS(_hs64, 64, true)
#endif
#if KERNEL_IN_PART(5)
FA_BF16_IO_ENTRY_POINTS(_hs64, 64, true, true)
#endif
#if KERNEL_IN_PART(6)
FA_BF16_IO_ENTRY_POINTS(_sync_hs64, 64, false, true)
#endif
// The same with the accurate expf (the flash_exp2 switch off).
#if KERNEL_IN_PART(7)
FA_BF16_F32_STORAGE_ENTRY_POINTS(_expf, 0, false)
#endif
#if KERNEL_IN_PART(8)
FA_BF16_IO_ENTRY_POINTS(_expf, 0, true, false)
#endif
#if KERNEL_IN_PART(9)
FA_BF16_IO_ENTRY_POINTS(_sync_expf, 0, false, false)
#endif
#if KERNEL_IN_PART(10)
FA_BF16_F32_STORAGE_ENTRY_POINTS(_hs64_expf, 64, false)
#endif
#if KERNEL_IN_PART(11)
FA_BF16_IO_ENTRY_POINTS(_hs64_expf, 64, true, false)
#endif
#if KERNEL_IN_PART(12)
FA_BF16_IO_ENTRY_POINTS(_sync_hs64_expf, 64, false, false)
#endif
