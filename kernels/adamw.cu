// adamw.cu: global gradient norm, clipping scale and the AdamW update with
// torch.optim.AdamW's arithmetic (fp32 parameters, gradients and moments).
//
// sumsq_parts(parts, g, n)
//   parts[blockIdx.x] = sum of g[i]^2 in f64 over a grid-stride loop of this block.
//   Launch: block 256 threads (fixed), grid = the number of parts (fixed by the caller, so
//   the result does not depend on the GPU); the host sums the parts in order.
//
// scale_inplace(x, n, s)        x *= s. 1-D: block 256, grid ceil(n / 256).
//
// adamw_update(p, g, m, v, n, decay, b1, b2, eps, step_size, bc2_sqrt, p_bf16)
//   p *= decay (1 - lr*wd for decayed tensors, 1 otherwise);
//   m += (g - m) (1 - b1); v = v b2 + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^step),
//   bc2_sqrt = sqrt(1 - b2^step). 1-D: block 256, grid ceil(n / 256).
//   p_bf16: nullptr, or (bf16 engine) the bf16 copy of p (unsigned short[n]), refreshed with
//   the new p rounded to nearest even (bf16_rne, kernels/common.cuh).

#define SUMSQ_THREADS 256

extern "C" __global__ void sumsq_parts(double* __restrict__ parts, const float* __restrict__ g,
                                       long long n) {
    __shared__ double sh[SUMSQ_THREADS];
    double acc = 0.0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        double x = (double)g[i];
        acc += x * x;
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) parts[blockIdx.x] = sh[0];
}

extern "C" __global__ void scale_inplace(float* __restrict__ x, long long n, float s) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] *= s;
}

extern "C" __global__ void adamw_update(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v,
                                        long long n, float decay, float b1, float b2,
                                        float eps, float step_size, float bc2_sqrt,
                                        unsigned short* __restrict__ p_bf16) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float pi = p[i] * decay;
    float mi = m[i] + (gi - m[i]) * (1.0f - b1);
    float vi = v[i] * b2 + (1.0f - b2) * gi * gi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    float pn = pi - step_size * mi / denom;
    p[i] = pn;
    m[i] = mi;
    v[i] = vi;
    if (p_bf16 != nullptr) p_bf16[i] = bf16_rne(pn);
}
