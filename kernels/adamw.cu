// adamw.cu: global gradient norm, and clipping with the AdamW update, with
// torch.optim.AdamW's arithmetic (fp32 parameters, gradients and moments).
//
// The kernels move four elements per thread with 16-byte accesses where the pointers are
// co-aligned (kernels/common.cuh, "vectorised access"); pointers into the flat parameter
// buffer at any offset work (element by element where they are not co-aligned).
//
// sumsq_parts(parts, g, n)
//   parts[blockIdx.x] = sum of g[i]^2 in f64 over a grid-stride loop of this block: thread
//   t of the grid sums its groups t, t + G, t + 2G, ... (G = grid threads; each group's
//   elements in order), then the block adds its threads' sums as a tree.
//   Launch: block 256 threads (fixed), grid = the number of parts (fixed by the caller, so
//   the result does not depend on the GPU); the host sums the parts in order.
//
// adamw_update(p, g, m, v, n, runs, n_runs, decay, clip, b1, b2, eps, step_size, bc2_sqrt,
//              p_bf16, store_g)
//   The whole optimizer step over n elements of the flat buffers in one launch:
//   with clip != 1: g *= clip (clip_grad_norm_'s scaling, fused), written back when
//   store_g != 0 (with 0 the caller keeps the factor and applies it if anything reads the
//   gradients before they are zeroed: 4 bytes per element less traffic);
//   p *= decay where weight decay applies (decay = 1 - lr*wd), unchanged elsewhere;
//   m += (g - m) (1 - b1); v = v b2 + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^step),
//   bc2_sqrt = sqrt(1 - b2^step). Grid ceil(ceil((n + 3) / 4) / 256) (grid_vec).
//   runs: n_runs pairs (start, decays) of long long, starts ascending from 0 relative to p:
//   elements [start_r, start_{r+1}) take weight decay when decays_r != 0 (the decayed and
//   undecayed tensors of the layout, adjacent ones of a kind merged). Each element finds
//   its run by binary search (a few dozen runs).
//   p_bf16: nullptr, or (bf16 engine) the bf16 copy of p (unsigned short[n]), refreshed with
//   the new p rounded to nearest even (bf16_rne, kernels/common.cuh).
//   The arithmetic is the same, operation for operation, as a scale_inplace over g followed
//   by one launch per run with its own decay factor.

#define SUMSQ_THREADS 256

extern "C" __global__ void sumsq_parts(double* __restrict__ parts, const float* __restrict__ g,
                                       long long n) {
    __shared__ double sh[SUMSQ_THREADS];
    int s = vec_shift(g, 4);
    long long groups = (n + s + 3) / 4;
    double acc = 0.0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < groups;
         t += stride) {
        Group4 q = group4(t, n, s, true);
        float x[4];
        ld4_ro(x, g, q, n);  // 0 outside [0, n): adds exactly nothing
#pragma unroll
        for (int k = 0; k < 4; k++) acc += (double)x[k] * (double)x[k];
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) sh[threadIdx.x] += sh[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) parts[blockIdx.x] = sh[0];
}

// Whether element i (relative to p) takes weight decay: the flag of the last run starting
// at or before i.
__device__ __forceinline__ bool adamw_decays(const long long* __restrict__ runs, int n_runs,
                                             long long i) {
    int lo = 0, hi = n_runs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (runs[2 * mid] <= i) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return runs[2 * lo + 1] != 0;
}

extern "C" __global__ void adamw_update(float* __restrict__ p, float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v,
                                        long long n, const long long* __restrict__ runs,
                                        int n_runs, float decay, float clip, float b1, float b2,
                                        float eps, float step_size, float bc2_sqrt,
                                        unsigned short* __restrict__ p_bf16, int store_g) {
    int s = vec_shift(p, 4);
    bool vec = vec_shift(g, 4) == s && vec_shift(m, 4) == s && vec_shift(v, 4) == s &&
               (p_bf16 == nullptr || vec_shift(p_bf16, 2) == s);
    Group4 q = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, n, s, vec);
    if (q.e0 >= n) return;
    float pv[4], gv[4], mv[4], vv[4];
    ld4(pv, p, q, n);
    ld4(gv, g, q, n);
    ld4(mv, m, q, n);
    ld4(vv, v, q, n);
    const bool clipping = clip != 1.0f;
    unsigned short b[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (clipping) gv[k] *= clip;
        float gi = gv[k];
        float pi = adamw_decays(runs, n_runs, q.e0 + k) ? pv[k] * decay : pv[k];
        float mi = mv[k] + (gi - mv[k]) * (1.0f - b1);
        float vi = vv[k] * b2 + (1.0f - b2) * gi * gi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        float pn = pi - step_size * mi / denom;
        pv[k] = pn;
        mv[k] = mi;
        vv[k] = vi;
        b[k] = bf16_rne(pn);
    }
    st4(p, q, n, pv);
    if (clipping && store_g) st4(g, q, n, gv);
    st4(m, q, n, mv);
    st4(v, q, n, vv);
    if (p_bf16 != nullptr) st4_bf16(p_bf16, q, n, b);
}
