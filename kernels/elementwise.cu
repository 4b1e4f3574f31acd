// elementwise.cu: GELU (tanh approximation; fp32, or bf16 out), bias broadcast and bias
// gradient, residual add, dropout with the CPU engine's counter-based mask (fp32).
//
// The 1-D kernels move four elements per thread (kernels/common.cuh, "vectorised
// access"): block 256 threads, grid ceil(ceil((n + 3) / 4) / 256) (kernels.rs: grid_vec).
// Every element's arithmetic is the same as one element per thread, so results do not
// depend on alignment.
//
// gelu_forward(out, x, n)            out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// gelu_backward_inplace(d, x, n)     d *= gelu'(x)
// gelu_forward_bf16(out, pre_out, x, x_bf16, n)
//                                    The bf16 MLP chain (engine switch bf16_mlp): out[i] =
//                                    bf16(gelu(v)) with v = x[i] (fp32; then pre_out, when
//                                    not null, gets bf16(x[i]): the saved pre-activation)
//                                    or, x null, v = x_bf16[i] widened (the GELU recomputed
//                                    from the saved bf16 pre-activation; pre_out null).
//                                    out, pre_out, x_bf16: bf16 bits. What cuBLASLt's
//                                    GELU_AUX epilogue with a bf16 D writes, unfused.
// gelu_backward_bf16(out, d, x_bf16, n)
//                                    out[i] = bf16(d[i] * gelu'(x_bf16[i] widened)), d fp32:
//                                    the DGELU epilogue with a bf16 D and bf16 GELU input,
//                                    unfused.
// bias_broadcast(out, b_or_null, rows, cols)
//                                    out[r, c] = b[c] (or 0): the start of an accumulating
//                                    GEMM, as the CPU engine's linear layer. Thread t owns
//                                    flat elements [4t, 4t + 4) (grid_vec(rows * cols));
//                                    vector path when cols % 4 == 0 and out, b are aligned.
// add_inplace(dst, src, n)           dst += src
// dropout_apply(out, in, n, seeds, slot, threshold, scale)
//                                    out[i] = keep(seed, i) ? in[i] * scale : 0, with i the
//                                    flat element index and seed = seeds[slot] (the pass's
//                                    seed table in device memory, so that a captured graph
//                                    replays with the seeds of each new pass); out may equal
//                                    in. keep() is the splitmix64-style hash of
//                                    src/engine/dropout.rs, so masks match the CPU engine
//                                    bit for bit.
// colsum_parts(parts, m, rows, cols, rows_per_part)
//                                    parts[p, c] = sum over rows [p*rpp, min(rows,(p+1)*rpp))
//                                    (in order) of m[r, c]. Thread t owns columns
//                                    [4t, 4t + 4): 2-D launch, block 256, grid
//                                    (ceil(ceil(cols / 4) / 256), P). Vector path when
//                                    cols % 4 == 0 and parts, m are aligned.
// reduce_parts_add(dst, parts, n_parts, cols, part_stride, accumulate)
//                                    dst[c] += sum over p (in order) of parts[p*part_stride + c];
//                                    with accumulate 0, dst[c] = the sum, dst not read (the
//                                    bits += gives over a zeroed dst: the sum starts at +0,
//                                    so it is never -0).
//                                    Thread t owns columns [4t, 4t + 4): grid
//                                    ceil(ceil(cols / 4) / 256). Vector path when cols and
//                                    part_stride are multiples of 4 and dst, parts aligned.
// The column sums add in the same order as with one column per thread.

#define GELU_K 0.7978846f

__device__ __forceinline__ bool keep(unsigned long long seed, unsigned long long i,
                                     unsigned int threshold) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned int)(z >> 32) >= threshold;
}

__device__ __forceinline__ long long thread_1d() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ float gelu(float v) {
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    return 0.5f * v * (1.0f + t);
}

__device__ __forceinline__ float gelu_grad(float v) {
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    float sech2 = 1.0f - t * t;
    return 0.5f * (1.0f + t) + 0.5f * v * sech2 * GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
}

extern "C" __global__ void gelu_forward(float* __restrict__ out, const float* __restrict__ x,
                                        long long n) {
    int s = vec_shift(out, 4);
    Group4 g = group4(thread_1d(), n, s, vec_shift(x, 4) == s);
    if (g.e0 >= n) return;
    float v[4];
    ld4_ro(v, x, g, n);
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = gelu(v[k]);
    st4(out, g, n, v);
}

extern "C" __global__ void gelu_backward_inplace(float* __restrict__ d,
                                                 const float* __restrict__ x, long long n) {
    int s = vec_shift(d, 4);
    Group4 g = group4(thread_1d(), n, s, vec_shift(x, 4) == s);
    if (g.e0 >= n) return;
    float v[4], dv[4];
    ld4_ro(v, x, g, n);
    ld4(dv, d, g, n);
#pragma unroll
    for (int k = 0; k < 4; k++) dv[k] *= gelu_grad(v[k]);
    st4(d, g, n, dv);
}

extern "C" __global__ void gelu_forward_bf16(unsigned short* __restrict__ out,
                                             unsigned short* __restrict__ pre_out,
                                             const float* __restrict__ x,
                                             const unsigned short* __restrict__ x_bf16,
                                             long long n) {
    int s = vec_shift(out, 2);
    bool co = x != nullptr
                  ? vec_shift(x, 4) == s && (pre_out == nullptr || vec_shift(pre_out, 2) == s)
                  : vec_shift(x_bf16, 2) == s;
    Group4 g = group4(thread_1d(), n, s, co);
    if (g.e0 >= n) return;
    float v[4];
    unsigned short b[4];
    if (x != nullptr) {
        ld4_ro(v, x, g, n);
        if (pre_out != nullptr) {
#pragma unroll
            for (int k = 0; k < 4; k++) b[k] = bf16_rne(v[k]);
            st4_bf16(pre_out, g, n, b);
        }
    } else {
        ld4_bf16(v, x_bf16, g, n);
    }
#pragma unroll
    for (int k = 0; k < 4; k++) b[k] = bf16_rne(gelu(v[k]));
    st4_bf16(out, g, n, b);
}

extern "C" __global__ void gelu_backward_bf16(unsigned short* __restrict__ out,
                                              const float* __restrict__ d,
                                              const unsigned short* __restrict__ x_bf16,
                                              long long n) {
    int s = vec_shift(out, 2);
    Group4 g = group4(thread_1d(), n, s, vec_shift(d, 4) == s && vec_shift(x_bf16, 2) == s);
    if (g.e0 >= n) return;
    float v[4], dv[4];
    ld4_bf16(v, x_bf16, g, n);
    ld4_ro(dv, d, g, n);
    unsigned short b[4];
#pragma unroll
    for (int k = 0; k < 4; k++) b[k] = bf16_rne(dv[k] * gelu_grad(v[k]));
    st4_bf16(out, g, n, b);
}

extern "C" __global__ void bias_broadcast(float* __restrict__ out, const float* __restrict__ b,
                                          int rows, int cols) {
    long long n = (long long)rows * cols;
    bool vec = cols % 4 == 0 && vec_aligned(out) && (b == nullptr || vec_aligned(b));
    Group4 g = group4(thread_1d(), n, 0, vec);
    if (g.e0 >= n) return;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (b != nullptr) {
        int col = (int)(g.e0 % cols);
        if (g.full) {
            Group4 gb = {col, true};  // cols % 4 == 0: the group lies in one row
            ld4_ro(v, b, gb, cols);
        } else {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (in_range(g.e0 + k, n)) v[k] = __ldg(b + col);
                col = (col + 1 == cols) ? 0 : col + 1;
            }
        }
    }
    st4(out, g, n, v);
}

extern "C" __global__ void add_inplace(float* __restrict__ dst, const float* __restrict__ src,
                                       long long n) {
    int s = vec_shift(dst, 4);
    Group4 g = group4(thread_1d(), n, s, vec_shift(src, 4) == s);
    if (g.e0 >= n) return;
    float a[4], b[4];
    ld4(a, dst, g, n);
    ld4_ro(b, src, g, n);
#pragma unroll
    for (int k = 0; k < 4; k++) a[k] += b[k];
    st4(dst, g, n, a);
}

extern "C" __global__ void dropout_apply(float* out, const float* in, long long n,
                                         const unsigned long long* __restrict__ seeds,
                                         int slot, unsigned int threshold, float scale) {
    const unsigned long long seed = seeds[slot];
    int s = vec_shift(out, 4);
    Group4 g = group4(thread_1d(), n, s, vec_shift(in, 4) == s);
    if (g.e0 >= n) return;
    float v[4];
    ld4(v, in, g, n);  // in may be out: plain loads, each element read before it is written
#pragma unroll
    for (int k = 0; k < 4; k++) {
        unsigned long long i = (unsigned long long)(g.e0 + k);  // unused when out of range
        v[k] = keep(seed, i, threshold) ? v[k] * scale : 0.0f;
    }
    st4(out, g, n, v);
}

extern "C" __global__ void colsum_parts(float* __restrict__ parts, const float* __restrict__ m,
                                        int rows, int cols, int rows_per_part) {
    bool vec = cols % 4 == 0 && vec_aligned(parts) && vec_aligned(m);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, cols, 0, vec);
    int p = blockIdx.y;
    if (g.e0 >= cols) return;
    int r0 = p * rows_per_part;
    int r1 = min(rows, r0 + rows_per_part);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = r0; r < r1; r++) {
        float v[4];
        ld4_ro(v, m + (long long)r * cols, g, cols);
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k] += v[k];
    }
    st4(parts + (long long)p * cols, g, cols, acc);
}

extern "C" __global__ void reduce_parts_add(float* __restrict__ dst,
                                            const float* __restrict__ parts, int n_parts,
                                            int cols, int part_stride, int accumulate) {
    bool vec = cols % 4 == 0 && part_stride % 4 == 0 && vec_aligned(dst) && vec_aligned(parts);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, cols, 0, vec);
    if (g.e0 >= cols) return;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int p = 0; p < n_parts; p++) {
        float v[4];
        ld4_ro(v, parts + (long long)p * part_stride, g, cols);
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k] += v[k];
    }
    if (accumulate) {
        float d[4];
        ld4(d, dst, g, cols);
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k] += d[k];
    }
    st4(dst, g, cols, acc);
}
