// elementwise.cu: GELU (tanh approximation), bias broadcast and bias gradient, residual
// add, dropout with the CPU engine's counter-based mask (fp32).
//
// All 1-D kernels: block 256 threads, grid ceil(n / 256), one element per thread.
//
// gelu_forward(out, x, n)            out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// gelu_backward_inplace(d, x, n)     d *= gelu'(x)
// bias_broadcast(out, b_or_null, rows, cols)
//                                    out[r, c] = b[c] (or 0): the start of an accumulating
//                                    GEMM, as the CPU engine's linear layer.
// add_inplace(dst, src, n)           dst += src
// dropout_apply(out, in, n, seed, threshold, scale)
//                                    out[i] = keep(seed, i) ? in[i] * scale : 0, with i the
//                                    flat element index; out may equal in. keep() is the
//                                    splitmix64-style hash of src/engine/dropout.rs, so
//                                    masks match the CPU engine bit for bit.
// colsum_parts(parts, m, rows, cols, rows_per_part)
//                                    parts[p, c] = sum over rows [p*rpp, min(rows,(p+1)*rpp))
//                                    of m[r, c]. 2-D launch: block 256, grid (ceil(cols/256), P).
// reduce_parts_add(dst, parts, n_parts, cols, part_stride)
//                                    dst[c] += sum over p (in order) of parts[p*part_stride + c].
//                                    1-D over cols.

#define GELU_K 0.7978846f

__device__ __forceinline__ bool keep(unsigned long long seed, unsigned long long i,
                                     unsigned int threshold) {
    unsigned long long z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (unsigned int)(z >> 32) >= threshold;
}

extern "C" __global__ void gelu_forward(float* __restrict__ out, const float* __restrict__ x,
                                        long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    out[i] = 0.5f * v * (1.0f + t);
}

extern "C" __global__ void gelu_backward_inplace(float* __restrict__ d,
                                                 const float* __restrict__ x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float t = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    float sech2 = 1.0f - t * t;
    float g = 0.5f * (1.0f + t) + 0.5f * v * sech2 * GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
    d[i] *= g;
}

extern "C" __global__ void bias_broadcast(float* __restrict__ out, const float* __restrict__ b,
                                          int rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    out[i] = (b != nullptr) ? b[i % cols] : 0.0f;
}

extern "C" __global__ void add_inplace(float* __restrict__ dst, const float* __restrict__ src,
                                       long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dst[i] += src[i];
}

extern "C" __global__ void dropout_apply(float* out, const float* in, long long n,
                                         unsigned long long seed, unsigned int threshold,
                                         float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = keep(seed, (unsigned long long)i, threshold) ? in[i] * scale : 0.0f;
}

extern "C" __global__ void colsum_parts(float* __restrict__ parts, const float* __restrict__ m,
                                        int rows, int cols, int rows_per_part) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int p = blockIdx.y;
    if (col >= cols) return;
    int r0 = p * rows_per_part;
    int r1 = min(rows, r0 + rows_per_part);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) acc += m[(long long)r * cols + col];
    parts[(long long)p * cols + col] = acc;
}

extern "C" __global__ void reduce_parts_add(float* __restrict__ dst,
                                            const float* __restrict__ parts, int n_parts,
                                            int cols, int part_stride) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    float acc = 0.0f;
    for (int p = 0; p < n_parts; p++) acc += parts[(long long)p * part_stride + col];
    dst[col] += acc;
}
