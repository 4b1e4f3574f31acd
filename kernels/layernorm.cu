// layernorm.cu: LayerNorm over rows of C channels, eps = 1e-5 (fp32), forward and backward.
//
// Shapes: x, out, dout, dx [N, C]; w, b, dw, db [C]; mean, rstd [N];
//         parts [P, 2C] (per row group: partial dw in [0, C), partial db in [C, 2C)).
//
// layernorm_forward(out, out_bf16, mean, rstd, x, w, b_or_null, N, C)
//   out = (x - mean) * rstd * w (+ b), rstd = 1 / sqrt(var + eps), biased variance.
//   Written to out (fp32) and/or out_bf16 (bf16 bits, the fp32 value rounded to nearest
//   even by bf16_rne); either may be null. The bf16 mode keeps LayerNorm outputs, which
//   only matrix products read, in bf16 alone.
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_backward_dx(dx, dx_bf16, dout, dout_bf16, x, w, mean, rstd, N, C)
//   dx += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, dnorm = w * dout.
//   dout is read from dout (fp32) or, when dout_bf16 is not null, from dout_bf16 (bf16
//   bits, widened exactly; dout is then unused): the bf16 mode's gradient of a LayerNorm
//   output as the products that compute it write it, at half the bytes. Given bf16 bits,
//   every backward kernel gives the same results as given their fp32 widening in dout.
//   dx_bf16 (may be null): the updated dx rounded to bf16 as well (bf16_rne, the bits
//   cast_f32_to_bf16 would give): the bf16 mode's copy of the residual-stream gradient for
//   the two backward products of the next linear layer, with no separate cast pass.
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_backward(dx, dx_bf16, parts, dout, dout_bf16, x, w, mean, rstd, N, C)
//   layernorm_backward_dx and the weight and bias gradients' partial sums in one pass over
//   dout and x: dx (and dx_bf16) exactly as layernorm_backward_dx writes them, and
//   parts[p, c] = sum over the block's rows of norm * dout, parts[p, C + c] = sum of dout,
//   for block p of LNB_ROWS = 32 rows [32p, min(N, 32p + 32)). Each lane sums its channels
//   over the rows its warp owns (rows 32p + warp, + 8, ...: in order), then the eight warps'
//   sums are added in warp order: deterministic. The parts are summed by reduce_parts_add
//   as layernorm_backward_parts' are. Needs C <= 1024 (LNB_MAX_GROUPS groups of four
//   channels per lane, held in registers); larger C takes the two kernels.
//   Launch: block 256 threads, grid ceil(N / 32); parts holds ceil(N / 32) x 2C floats.
//   Two blocks per multiprocessor: __launch_bounds__(256, 2) holds the kernel to 128
//   registers (each of its two loops, fp32 or bf16 dout, needs ~123 alone; together,
//   unbounded, the compiler takes 173 and one block fits).
//
// layernorm_backward_parts(parts, dout, dout_bf16, x, mean, rstd, N, C, rows_per_part)
//   parts[p, c] = sum over the rows of group p of norm * dout; parts[p, C + c] = sum of dout.
//   Row group p holds rows [p * rows_per_part, min(N, (p + 1) * rows_per_part)).
//   Launch: 2-D; block 256, grid (ceil(ceil(C / 4) / 256), P). Deterministic. The groups
//   are then summed in order into dw and db by reduce_parts_add (elementwise.cu).
//
// residual_layernorm_forward(res, out, out_bf16, mean, rstd, a, b, w, bias_or_null, N, C)
//   res = a + b, then out = LayerNorm(res) exactly as layernorm_forward computes it (same
//   sums in the same order, same expressions): the residual add followed by the next
//   LayerNorm in one pass. res may be the same buffer as a or b (each element is read and
//   then written by the same thread, and only that thread reads it back).
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_recompute(out, out_bf16, x, mean, rstd, w, b_or_null, N, C)
//   out = (x - mean) * rstd * w (+ b) with the mean and rstd the forward pass saved: bit for
//   bit the output layernorm_forward / residual_layernorm_forward wrote (the same ln_apply,
//   whose arithmetic is spelled out in round-to-nearest intrinsics so that the compiler
//   cannot contract it into FMAs differently in the two kernels). The backward pass's
//   recomputation of ln1 / ln2 (recompute=2).
//   Launch: thread t owns flat elements [4t, 4t + 4) of the N * C; block 256 threads,
//   grid ceil(ceil((N * C + 3) / 4) / 256) (kernels.rs: grid_vec).
//
// Vectorised access (kernels/common.cuh): in the warp-per-row kernels lane l owns the
// groups of four channels starting at 4l, 4l + 128, 4l + 256, ... of its row and adds its
// elements in that order (then warp_sum); a group is one 16-byte access (8-byte for bf16)
// when C % 4 == 0 and every pointer the kernel touches per row is 16-byte (bf16: 8-byte)
// aligned, else element by element; the sums are the same either way, so results do not depend on alignment.
// layernorm_backward_parts: thread t owns channels [4t, 4t + 4) (grid
// (ceil(ceil(C / 4) / 256), P)) and adds the rows of its group in order (per channel,
// the order of one channel per thread).

#define LN_EPS 1e-5f
#define LNB_MAX_GROUPS 8  // layernorm_backward: channels per lane / 4 (c <= 1024)
#define LNB_ROWS 32       // layernorm_backward: rows per block (4 per warp)

// Normalise, scale and shift one element (has_b: whether there is a bias b).
__device__ __forceinline__ float ln_apply(float x, float m, float r, float w, float b,
                                          bool has_b) {
    float y = __fmul_rn(__fmul_rn(__fsub_rn(x, m), r), w);
    if (has_b) y = __fadd_rn(y, b);
    return y;
}

// Stores one group of outputs: fp32 to o and/or bf16 to ob (each may be null).
__device__ __forceinline__ void ln_store(float* o, unsigned short* ob, Group4 g, long long n,
                                         const float (&y)[4]) {
    if (o) st4(o, g, n, y);
    if (ob) {
        unsigned short h[4];
#pragma unroll
        for (int e = 0; e < 4; e++) h[e] = bf16_rne(y[e]);
        st4_bf16(ob, g, n, h);
    }
}

// Whether the outputs allow vector stores: each null, or aligned (fp32: 16 bytes; bf16: 8).
__device__ __forceinline__ bool ln_outs_aligned(const float* o, const unsigned short* ob) {
    return (o == nullptr || vec_aligned(o)) && (ob == nullptr || vec_shift(ob, 2) == 0);
}

// Lane `lane`'s k-th group of a row of c channels: channels [4 (lane + 32k), + 4).
__device__ __forceinline__ Group4 row_group(int lane, int k, int c, bool vec) {
    return group4((long long)lane + 32ll * k, c, 0, vec);
}

__device__ __forceinline__ bool row_has(Group4 g, int k, int c) {
    return g.full || g.e0 + k < c;
}

// The rest of one row's LayerNorm, for the warp that owns the row, once each lane has summed
// its elements of xr into s (its groups in order): mean, variance (two-pass), normalise,
// scale and shift; writes o and/or ob (see ln_store), mean[row] and rstd[row]. Every lane
// of the warp must call it. xr may have been written by this lane in this kernel (plain
// loads).
__device__ __forceinline__ void layernorm_row(const float* xr, float s, float* o,
                                              unsigned short* ob, float* mean, float* rstd,
                                              const float* w,
                                              const float* b, int row, int c, int lane,
                                              bool vec) {
    float m = warp_sum(s) / (float)c;
    float var = 0.0f;
    for (int k = 0; 4 * (lane + 32 * k) < c; k++) {
        Group4 g = row_group(lane, k, c, vec);
        float x[4];
        ld4(x, xr, g, c);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (row_has(g, e, c)) {
                float d = x[e] - m;
                var += d * d;
            }
        }
    }
    var = warp_sum(var);
    float r = 1.0f / sqrtf(var / (float)c + LN_EPS);
    bool has_b = b != nullptr;
    for (int k = 0; 4 * (lane + 32 * k) < c; k++) {
        Group4 g = row_group(lane, k, c, vec);
        float x[4], wv[4], bv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4];
        ld4(x, xr, g, c);
        ld4_ro(wv, w, g, c);
        if (has_b) ld4_ro(bv, b, g, c);
#pragma unroll
        for (int e = 0; e < 4; e++) y[e] = ln_apply(x[e], m, r, wv[e], bv[e], has_b);
        ln_store(o, ob, g, c, y);
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward(float* __restrict__ out,
                                             unsigned short* __restrict__ out_bf16,
                                             float* __restrict__ mean,
                                             float* __restrict__ rstd,
                                             const float* __restrict__ x,
                                             const float* __restrict__ w,
                                             const float* __restrict__ b,
                                             int n_rows, int c) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;  // whole warps exit together
    bool vec = c % 4 == 0 && ln_outs_aligned(out, out_bf16) && vec_aligned(x) &&
               vec_aligned(w) && (b == nullptr || vec_aligned(b));
    long long base = (long long)row * c;
    const float* xr = x + base;
    float s = 0.0f;
    for (int k = 0; 4 * (lane + 32 * k) < c; k++) {
        Group4 g = row_group(lane, k, c, vec);
        float v[4];
        ld4_ro(v, xr, g, c);
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (row_has(g, e, c)) s += v[e];
    }
    layernorm_row(xr, s, out ? out + base : nullptr, out_bf16 ? out_bf16 + base : nullptr,
                  mean, rstd, w, b, row, c, lane, vec);
}

// The gradient of a LayerNorm output as the backward kernels read it: fp32 (`f`), or bf16
// bits (`h`) when h is not null (then f is unused).
struct LnGrad {
    const float* f;
    const unsigned short* h;
};

// The gradient from element `base` on (rows of the gradient: base = row * c).
__device__ __forceinline__ LnGrad ln_grad_at(LnGrad d, long long base) {
    return d.h ? LnGrad{nullptr, d.h + base} : LnGrad{d.f + base, nullptr};
}

// One group of the gradient in fp32 (a bf16 value widened exactly); read-only data. H:
// whether the gradient is bf16 (d.h not null). A compile-time choice, so that each kernel
// runs one of two loops chosen once, rather than branch (and keep registers for both
// paths) at every load.
template <bool H>
__device__ __forceinline__ void ld4_grad(float (&v)[4], LnGrad d, Group4 g, long long n) {
    if constexpr (H) {
        ld4_bf16(v, d.h, g, n);
    } else {
        ld4_ro(v, d.f, g, n);
    }
}

// A compile-time bool as a value (to pick ld4_grad's H in a generic lambda).
template <bool B>
struct Bool {
    static constexpr bool value = B;
};

// Whether the gradient allows vector loads (fp32: 16-byte aligned; bf16: 8-byte).
__device__ __forceinline__ bool ln_grad_aligned(LnGrad d) {
    return d.h ? vec_shift(d.h, 2) == 0 : vec_aligned(d.f);
}

// The two sums of a row's backward over one group: a1 += w * dout, a2 += w * dout * norm.
__device__ __forceinline__ void ln_bwd_sums(float& a1, float& a2, const float (&xv)[4],
                                            const float (&dv)[4], const float (&wv)[4],
                                            Group4 g, int c, float m, float s) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        if (row_has(g, e, c)) {
            float norm = (xv[e] - m) * s;
            float dnorm = wv[e] * dv[e];
            a1 += dnorm;
            a2 += dnorm * norm;
        }
    }
}

// o += (w * dout - a1 - norm * a2) * rstd over one group (a1, a2 the row means).
__device__ __forceinline__ void ln_bwd_update(float (&o)[4], const float (&xv)[4],
                                              const float (&dv)[4], const float (&wv)[4],
                                              float m, float s, float a1, float a2) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
        float norm = (xv[e] - m) * s;
        float dnorm = wv[e] * dv[e];
        o[e] += (dnorm - a1 - norm * a2) * s;
    }
}

// Whether the backward kernels may use vector accesses on these pointers.
__device__ __forceinline__ bool ln_bwd_vec(const float* dx, const unsigned short* dx_bf16,
                                           LnGrad dout, const float* x, const float* w, int c) {
    return c % 4 == 0 && ln_outs_aligned(dx, dx_bf16) && ln_grad_aligned(dout) &&
           vec_aligned(x) && vec_aligned(w);
}

// The backward of one row for the warp that owns it (every lane calls it): dx += ... (and
// its bf16 copy when dbr is not null), the lane's groups of channels in order. With
// KMAX > 0 (c <= 128 KMAX) the groups are unrolled and each group's norm * dout and dout
// are added to gw[k], gb[k] (the weight and bias gradients' sums); with KMAX = 0, any c and
// no sums. The same arithmetic either way. H: whether dr is bf16 (ld4_grad).
template <int KMAX, bool H>
__device__ __forceinline__ void ln_backward_row(float* dxr, unsigned short* dbr,
                                                LnGrad dr, const float* xr,
                                                const float* w, float m, float s, int c,
                                                int lane, bool vec,
                                                float (&gw)[KMAX > 0 ? KMAX : 1][4],
                                                float (&gb)[KMAX > 0 ? KMAX : 1][4]) {
    const int kend = KMAX > 0 ? KMAX : (c + 127) / 128;
    float a1 = 0.0f, a2 = 0.0f;
#pragma unroll
    for (int k = 0; k < kend; k++) {
        if (4 * (lane + 32 * k) < c) {
            Group4 g = row_group(lane, k, c, vec);
            float xv[4], dv[4], wv[4];
            ld4_ro(xv, xr, g, c);
            ld4_grad<H>(dv, dr, g, c);
            ld4_ro(wv, w, g, c);
            ln_bwd_sums(a1, a2, xv, dv, wv, g, c, m, s);
        }
    }
    a1 = warp_sum(a1) / (float)c;
    a2 = warp_sum(a2) / (float)c;
#pragma unroll
    for (int k = 0; k < kend; k++) {
        if (4 * (lane + 32 * k) < c) {
            Group4 g = row_group(lane, k, c, vec);
            float xv[4], dv[4], wv[4], o[4];
            ld4_ro(xv, xr, g, c);
            ld4_grad<H>(dv, dr, g, c);
            ld4_ro(wv, w, g, c);
            ld4(o, dxr, g, c);
            ln_bwd_update(o, xv, dv, wv, m, s, a1, a2);
            ln_store(dxr, dbr, g, c, o);
            if constexpr (KMAX > 0) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (row_has(g, e, c)) {
                        gw[k][e] += (xv[e] - m) * s * dv[e];
                        gb[k][e] += dv[e];
                    }
                }
            }
        }
    }
}

extern "C" __global__ void layernorm_backward_dx(float* __restrict__ dx,
                                                 unsigned short* __restrict__ dx_bf16,
                                                 const float* __restrict__ dout,
                                                 const unsigned short* __restrict__ dout_bf16,
                                                 const float* __restrict__ x,
                                                 const float* __restrict__ w,
                                                 const float* __restrict__ mean,
                                                 const float* __restrict__ rstd,
                                                 int n_rows, int c) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    long long base = (long long)row * c;
    const LnGrad d = {dout, dout_bf16};
    const bool vec = ln_bwd_vec(dx, dx_bf16, d, x, w, c);
    float none[1][4];
    unsigned short* dbr = dx_bf16 ? dx_bf16 + base : nullptr;
    if (d.h) {
        ln_backward_row<0, true>(dx + base, dbr, ln_grad_at(d, base), x + base, w, mean[row],
                                 rstd[row], c, lane, vec, none, none);
    } else {
        ln_backward_row<0, false>(dx + base, dbr, ln_grad_at(d, base), x + base, w, mean[row],
                                  rstd[row], c, lane, vec, none, none);
    }
}

extern "C" __global__ void __launch_bounds__(256, 2)
layernorm_backward(float* __restrict__ dx, unsigned short* __restrict__ dx_bf16,
                   float* __restrict__ parts, const float* __restrict__ dout,
                   const unsigned short* __restrict__ dout_bf16, const float* __restrict__ x,
                   const float* __restrict__ w, const float* __restrict__ mean,
                   const float* __restrict__ rstd, int n_rows, int c) {
    __shared__ float acc[2 * 128 * LNB_MAX_GROUPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const LnGrad d = {dout, dout_bf16};
    const bool vec = ln_bwd_vec(dx, dx_bf16, d, x, w, c);
    // This lane's sums of norm * dout (gw) and dout (gb) over its groups of channels,
    // over the block's rows this warp owns, in row order.
    float gw[LNB_MAX_GROUPS][4], gb[LNB_MAX_GROUPS][4];
#pragma unroll
    for (int k = 0; k < LNB_MAX_GROUPS; k++)
#pragma unroll
        for (int e = 0; e < 4; e++) gw[k][e] = gb[k][e] = 0.0f;
    const int r1 = min(n_rows, (blockIdx.x + 1) * LNB_ROWS);
    auto rows = [&](auto h) {
        for (int row = blockIdx.x * LNB_ROWS + warp; row < r1; row += 8) {
            long long base = (long long)row * c;
            ln_backward_row<LNB_MAX_GROUPS, decltype(h)::value>(
                dx + base, dx_bf16 ? dx_bf16 + base : nullptr, ln_grad_at(d, base), x + base, w,
                mean[row], rstd[row], c, lane, vec, gw, gb);
        }
    };
    if (d.h) {
        rows(Bool<true>{});
    } else {
        rows(Bool<false>{});
    }
    // The warps' sums in warp order into shared memory, then the block's partial sums out.
    for (int wp = 0; wp < 8; wp++) {
        if (warp == wp) {
#pragma unroll
            for (int k = 0; k < LNB_MAX_GROUPS; k++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int ch = 4 * (lane + 32 * k) + e;
                    if (ch < c) {
                        acc[ch] = wp == 0 ? gw[k][e] : acc[ch] + gw[k][e];
                        acc[c + ch] = wp == 0 ? gb[k][e] : acc[c + ch] + gb[k][e];
                    }
                }
            }
        }
        __syncthreads();
    }
    float* out = parts + (long long)blockIdx.x * 2 * c;
    for (int i = threadIdx.x; i < 2 * c; i += blockDim.x) out[i] = acc[i];
}

extern "C" __global__ void layernorm_backward_parts(float* __restrict__ parts,
                                                    const float* __restrict__ dout,
                                                    const unsigned short* __restrict__ dout_bf16,
                                                    const float* __restrict__ x,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd,
                                                    int n_rows, int c, int rows_per_part) {
    const LnGrad dg = {dout, dout_bf16};
    bool vec = c % 4 == 0 && vec_aligned(parts) && ln_grad_aligned(dg) && vec_aligned(x);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, c, 0, vec);
    int p = blockIdx.y;
    if (g.e0 >= c) return;
    int r0 = p * rows_per_part;
    int r1 = min(n_rows, r0 + rows_per_part);
    float dw[4] = {0.0f, 0.0f, 0.0f, 0.0f}, db[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = r0; r < r1; r++) {
        long long base = (long long)r * c;
        float d[4], xv[4];
        if (dg.h) {
            ld4_grad<true>(d, ln_grad_at(dg, base), g, c);
        } else {
            ld4_grad<false>(d, ln_grad_at(dg, base), g, c);
        }
        ld4_ro(xv, x + base, g, c);
        float m = mean[r], s = rstd[r];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            dw[e] += (xv[e] - m) * s * d[e];
            db[e] += d[e];
        }
    }
    st4(parts + (long long)p * 2 * c, g, c, dw);
    st4(parts + (long long)p * 2 * c + c, g, c, db);
}

extern "C" __global__ void residual_layernorm_forward(float* res,
                                                      float* __restrict__ out,
                                                      unsigned short* __restrict__ out_bf16,
                                                      float* __restrict__ mean,
                                                      float* __restrict__ rstd,
                                                      const float* a,
                                                      const float* b,
                                                      const float* __restrict__ w,
                                                      const float* __restrict__ bias,
                                                      int n_rows, int c) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;  // whole warps exit together
    bool vec = c % 4 == 0 && vec_aligned(res) && ln_outs_aligned(out, out_bf16) &&
               vec_aligned(a) && vec_aligned(b) && vec_aligned(w) &&
               (bias == nullptr || vec_aligned(bias));
    long long base = (long long)row * c;
    float* xr = res + base;
    float s = 0.0f;
    for (int k = 0; 4 * (lane + 32 * k) < c; k++) {
        Group4 g = row_group(lane, k, c, vec);
        float av[4], bv[4];
        ld4(av, a + base, g, c);  // a or b may be res: plain loads, read before written
        ld4(bv, b + base, g, c);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            av[e] = av[e] + bv[e];
            if (row_has(g, e, c)) s += av[e];
        }
        st4(xr, g, c, av);
    }
    layernorm_row(xr, s, out ? out + base : nullptr, out_bf16 ? out_bf16 + base : nullptr,
                  mean, rstd, w, bias, row, c, lane, vec);
}

extern "C" __global__ void layernorm_recompute(float* __restrict__ out,
                                               unsigned short* __restrict__ out_bf16,
                                               const float* __restrict__ x,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd,
                                               const float* __restrict__ w,
                                               const float* __restrict__ b,
                                               int n_rows, int c) {
    long long n = (long long)n_rows * c;
    bool vec = c % 4 == 0 && ln_outs_aligned(out, out_bf16) && vec_aligned(x) &&
               vec_aligned(w) && (b == nullptr || vec_aligned(b));
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, n, 0, vec);
    if (g.e0 >= n) return;
    bool has_b = b != nullptr;
    float xv[4], y[4];
    ld4_ro(xv, x, g, n);
    if (g.full) {
        // c % 4 == 0: the group lies in one row
        int row = (int)(g.e0 / c);
        Group4 gc = {g.e0 - (long long)row * c, true};
        float wv[4], bv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        ld4_ro(wv, w, gc, c);
        if (has_b) ld4_ro(bv, b, gc, c);
        float m = mean[row], r = rstd[row];
#pragma unroll
        for (int e = 0; e < 4; e++) y[e] = ln_apply(xv[e], m, r, wv[e], bv[e], has_b);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            long long i = g.e0 + e;
            y[e] = 0.0f;
            if (i < n) {
                int row = (int)(i / c);
                int col = (int)(i % c);
                y[e] = ln_apply(xv[e], mean[row], rstd[row], w[col], has_b ? b[col] : 0.0f,
                                has_b);
            }
        }
    }
    ln_store(out, out_bf16, g, n, y);
}
