// decode.cu: incremental decoding with a KV cache (fp32): appending new keys/values to the
// cache and attention of new queries over the cached positions.
//
// Shapes (C = NH * HS channels, T_MAX = block_size):
//   qkv   [R, 3C] rows of the new tokens, R = n_seq * nq (row r = sequence r / nq, query
//         r % nq at position pos0 + r % nq); q in [0, C), k in [C, 2C), v in [2C, 3C).
//   kc, vc [n_seq, T_MAX, C] the cache of one layer; y [R, C].
//
// decode_kv_append(kc, vc, qkv, R, nq, pos0, T_MAX, C)
//   kc[s, pos0 + i, :] = k of row r = s*nq + i; vc likewise with v.
//   Launch: thread t copies flat elements [4t, 4t + 4) of the R*C (kernels/common.cuh,
//   "vectorised access": 16-byte copies when C % 4 == 0 and the pointers are aligned);
//   block 256, grid ceil(ceil((R*C + 3) / 4) / 256) (kernels.rs: grid_vec).
//
// decode_attention(y, qkv, kc, vc, nq, pos0, NH, HS, T_MAX, scale)
//   For row r (sequence s, query i, L = pos0 + i + 1 visible positions) and head h:
//     y[r, h*HS:(h+1)*HS] = sum_{j<L} softmax_j(scale * q.k_j) v_j
//   with q, k_j, v_j the head's slices of the row's q and of cached position j of sequence s.
//   The softmax is the CPU engine's: max subtracted first, exp(x*scale - max*scale), sums in
//   fp32. Keys are taken in tiles of DEC_TILE positions with the scores of a tile in shared
//   memory; across tiles the running max, sum and output are rescaled (online softmax), so
//   any block_size works. The output slice serves as the accumulator between tiles.
//   Launch: one block per (row, head): grid R*NH (block r*NH + h); block DEC_THREADS = 256
//   threads (fixed: the shared arrays are sized for it); no dynamic shared memory.
//   The cache must hold positions [0, pos0 + nq) of every sequence (decode_kv_append first).

#define DEC_THREADS 256
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_TILE 1024

// Max or sum of v over the block; every thread gets the same value (the warps' results are
// combined in warp order by each thread, so the result is deterministic).
__device__ float block_reduce(float v, bool is_max, float* red) {
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads();  // the previous reduction's reads of red are done
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < DEC_WARPS; w++) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    return r;
}

extern "C" __global__ void decode_kv_append(float* __restrict__ kc, float* __restrict__ vc,
                                            const float* __restrict__ qkv, int rows, int nq,
                                            int pos0, int t_max, int c) {
    long long n = (long long)rows * c;
    bool vec = c % 4 == 0 && vec_aligned(kc) && vec_aligned(vc) && vec_aligned(qkv);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, n, 0, vec);
    if (g.e0 >= n) return;
    if (g.full) {
        // c % 4 == 0: the group lies in one row
        int r = (int)(g.e0 / c);
        int j = (int)(g.e0 % c);
        int s = r / nq;
        int pos = pos0 + r % nq;
        Group4 gd = {((long long)s * t_max + pos) * c + j, true};
        Group4 gk = {(long long)r * 3 * c + c + j, true};
        Group4 gv = {gk.e0 + c, true};
        float k4[4], v4[4];
        ld4_ro(k4, qkv, gk, gk.e0 + 4);
        ld4_ro(v4, qkv, gv, gv.e0 + 4);
        st4(kc, gd, gd.e0 + 4, k4);
        st4(vc, gd, gd.e0 + 4, v4);
        return;
    }
    for (int e = 0; e < 4; e++) {
        long long i = g.e0 + e;
        if (i >= n) break;
        int r = (int)(i / c);
        int j = (int)(i % c);
        int s = r / nq;
        int pos = pos0 + r % nq;
        long long dst = ((long long)s * t_max + pos) * c + j;
        long long src = (long long)r * 3 * c + j;
        kc[dst] = qkv[src + c];
        vc[dst] = qkv[src + 2 * c];
    }
}

extern "C" __global__ void decode_attention(float* __restrict__ y,
                                            const float* __restrict__ qkv,
                                            const float* __restrict__ kc,
                                            const float* __restrict__ vc, int nq, int pos0,
                                            int nh, int hs, int t_max, float scale) {
    __shared__ float sc[DEC_TILE];
    __shared__ float part[DEC_THREADS];
    __shared__ float red[DEC_WARPS];
    const float neg_inf = __int_as_float(0xff800000);
    int c = nh * hs;
    long long r = blockIdx.x / nh;
    int h = blockIdx.x % nh;
    long long s = r / nq;
    int len = pos0 + (int)(r % nq) + 1;
    const float* q = qkv + r * 3 * c + h * hs;
    const float* kb = kc + s * t_max * c + h * hs;
    const float* vb = vc + s * t_max * c + h * hs;
    float* out = y + r * c + h * hs;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    float m = neg_inf;  // running max of the raw scores
    float l = 0.0f;     // running sum of exp(scale * (score - m))
    for (int t0 = 0; t0 < len; t0 += DEC_TILE) {
        int n = min(DEC_TILE, len - t0);
        // raw scores q . k_j, one warp per position
        for (int j = warp; j < n; j += DEC_WARPS) {
            const float* k = kb + (long long)(t0 + j) * c;
            float d = 0.0f;
            for (int e = lane; e < hs; e += 32) d += q[e] * k[e];
            d = warp_sum(d);
            if (lane == 0) sc[j] = d;
        }
        __syncthreads();
        float mt = neg_inf;
        for (int j = tid; j < n; j += DEC_THREADS) mt = fmaxf(mt, sc[j]);
        mt = block_reduce(mt, true, red);
        float m_new = fmaxf(m, mt);
        float ms = m_new * scale;
        float lt = 0.0f;
        for (int j = tid; j < n; j += DEC_THREADS) {
            float e = expf(sc[j] * scale - ms);
            sc[j] = e;
            lt += e;
        }
        lt = block_reduce(lt, false, red);  // its barriers also publish the sc writes
        float corr = (t0 == 0) ? 0.0f : expf(m * scale - ms);
        l = l * corr + lt;
        m = m_new;
        // out = out * corr + sum_j p_j v_j; the owner of out[e] is thread e % DEC_THREADS
        if (hs <= DEC_THREADS) {
            // groups of hs threads split the positions; partial sums combined in group order
            int groups = DEC_THREADS / hs;
            int g = tid / hs, e = tid % hs;
            float acc = 0.0f;
            if (g < groups) {
                for (int j = g; j < n; j += groups) acc += sc[j] * vb[(long long)(t0 + j) * c + e];
            }
            part[tid] = acc;
            __syncthreads();
            if (tid < hs) {
                float sum = 0.0f;
                for (int gg = 0; gg < groups; gg++) sum += part[gg * hs + tid];
                out[tid] = (t0 == 0) ? sum : out[tid] * corr + sum;
            }
        } else {
            for (int e = tid; e < hs; e += DEC_THREADS) {
                float acc = 0.0f;
                for (int j = 0; j < n; j++) acc += sc[j] * vb[(long long)(t0 + j) * c + e];
                out[e] = (t0 == 0) ? acc : out[e] * corr + acc;
            }
        }
        __syncthreads();  // sc and part are rewritten by the next tile
    }
    float inv = 1.0f / l;
    for (int e = tid; e < hs; e += DEC_THREADS) out[e] *= inv;
}
