// layernorm.cu: LayerNorm over rows of C channels, eps = 1e-5 (fp32), forward and backward.
//
// Shapes: x, out, dout, dx [N, C]; w, b, dw, db [C]; mean, rstd [N];
//         parts [P, 2C] (per row group: partial dw in [0, C), partial db in [C, 2C)).
//
// layernorm_forward(out, mean, rstd, x, w, b_or_null, N, C)
//   out = (x - mean) * rstd * w (+ b), rstd = 1 / sqrt(var + eps), biased variance.
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_backward_dx(dx, dout, x, w, mean, rstd, N, C)
//   dx += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd, dnorm = w * dout.
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_backward_parts(parts, dout, x, mean, rstd, N, C, rows_per_part)
//   parts[p, c] = sum over the rows of group p of norm * dout; parts[p, C + c] = sum of dout.
//   Row group p holds rows [p * rows_per_part, min(N, (p + 1) * rows_per_part)).
//   Launch: 2-D; block 256, grid (ceil(C / 256), P). Deterministic. The groups are then
//   summed in order into dw and db by reduce_parts_add (elementwise.cu).
//
// residual_layernorm_forward(res, out, mean, rstd, a, b, w, bias_or_null, N, C)
//   res = a + b, then out = LayerNorm(res) exactly as layernorm_forward computes it (same
//   sums in the same order, same expressions): the residual add followed by the next
//   LayerNorm in one pass. res may be the same buffer as a or b (each element is read and
//   then written by the same thread, and only that thread reads it back).
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(N / 8).
//
// layernorm_recompute(out, x, mean, rstd, w, b_or_null, N, C)
//   out = (x - mean) * rstd * w (+ b) with the mean and rstd the forward pass saved: bit for
//   bit the output layernorm_forward / residual_layernorm_forward wrote (the same ln_apply,
//   whose arithmetic is spelled out in round-to-nearest intrinsics so that the compiler
//   cannot contract it into FMAs differently in the two kernels). The backward pass's
//   recomputation of ln1 / ln2 (recompute=2).
//   Launch: 1-D over N * C elements; block 256 threads, grid ceil(N * C / 256).

#define LN_EPS 1e-5f

// Normalise, scale and shift one element (b_or_null: the bias vector or nullptr).
__device__ __forceinline__ float ln_apply(float x, float m, float r, float w,
                                          const float* b, int i) {
    float y = __fmul_rn(__fmul_rn(__fsub_rn(x, m), r), w);
    if (b != nullptr) y = __fadd_rn(y, b[i]);
    return y;
}

// The rest of one row's LayerNorm, for the warp that owns the row, once each lane has summed
// its elements of xr into s: mean, variance (two-pass), normalise, scale and shift; writes
// o, mean[row] and rstd[row]. Every lane of the warp must call it.
__device__ __forceinline__ void layernorm_row(const float* xr, float s, float* o,
                                              float* mean, float* rstd, const float* w,
                                              const float* b, int row, int c, int lane) {
    float m = warp_sum(s) / (float)c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = xr[i] - m;
        v += d * d;
    }
    v = warp_sum(v);
    float r = 1.0f / sqrtf(v / (float)c + LN_EPS);
    for (int i = lane; i < c; i += 32) o[i] = ln_apply(xr[i], m, r, w[i], b, i);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_forward(float* __restrict__ out,
                                             float* __restrict__ mean,
                                             float* __restrict__ rstd,
                                             const float* __restrict__ x,
                                             const float* __restrict__ w,
                                             const float* __restrict__ b,
                                             int n_rows, int c) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;  // whole warps exit together
    const float* xr = x + (long long)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += xr[i];
    layernorm_row(xr, s, out + (long long)row * c, mean, rstd, w, b, row, c, lane);
}

extern "C" __global__ void layernorm_backward_dx(float* __restrict__ dx,
                                                 const float* __restrict__ dout,
                                                 const float* __restrict__ x,
                                                 const float* __restrict__ w,
                                                 const float* __restrict__ mean,
                                                 const float* __restrict__ rstd,
                                                 int n_rows, int c) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n_rows) return;
    long long base = (long long)row * c;
    float m = mean[row], s = rstd[row];
    float a1 = 0.0f, a2 = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[base + i] - m) * s;
        float dnorm = w[i] * dout[base + i];
        a1 += dnorm;
        a2 += dnorm * norm;
    }
    a1 = warp_sum(a1) / (float)c;
    a2 = warp_sum(a2) / (float)c;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[base + i] - m) * s;
        float dnorm = w[i] * dout[base + i];
        dx[base + i] += (dnorm - a1 - norm * a2) * s;
    }
}

extern "C" __global__ void layernorm_backward_parts(float* __restrict__ parts,
                                                    const float* __restrict__ dout,
                                                    const float* __restrict__ x,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd,
                                                    int n_rows, int c, int rows_per_part) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int p = blockIdx.y;
    if (col >= c) return;
    int r0 = p * rows_per_part;
    int r1 = min(n_rows, r0 + rows_per_part);
    float dw = 0.0f, db = 0.0f;
    for (int r = r0; r < r1; r++) {
        long long i = (long long)r * c + col;
        float d = dout[i];
        dw += (x[i] - mean[r]) * rstd[r] * d;
        db += d;
    }
    parts[(long long)p * 2 * c + col] = dw;
    parts[(long long)p * 2 * c + c + col] = db;
}

extern "C" __global__ void residual_layernorm_forward(float* res,
                                                      float* __restrict__ out,
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
    long long base = (long long)row * c;
    float* xr = res + base;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float v = a[base + i] + b[base + i];
        xr[i] = v;
        s += v;
    }
    layernorm_row(xr, s, out + base, mean, rstd, w, bias, row, c, lane);
}

extern "C" __global__ void layernorm_recompute(float* __restrict__ out,
                                               const float* __restrict__ x,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd,
                                               const float* __restrict__ w,
                                               const float* __restrict__ b,
                                               int n_rows, int c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_rows * c) return;
    int row = (int)(i / c);
    int col = (int)(i % c);
    out[i] = ln_apply(x[i], mean[row], rstd[row], w[col], b, col);
}
