// doctor.cu: the GPU self-test of `nanogpt doctor`, checked bit for bit against the host
// reference in src/cuda/bf16.rs.
//
// Kernel: doctor_selftest(const float* x, unsigned short* bits, float* warp_sums, int n)
//   x          [n]            f32 inputs
//   bits       [n]            bf16 bit patterns of x, round-to-nearest-even (NaN kept quiet)
//   warp_sums  [ceil(n/32)]   per warp of 32 consecutive elements: the sum of the rounded
//                             values by a butterfly reduction (__shfl_xor_sync with offsets
//                             16, 8, 4, 2, 1); lanes past n contribute +0.0
// Launch geometry: 1-D; block = 256 threads (any multiple of 32 works), grid =
//   ceil(n / 256) blocks, no shared memory. Every lane of every warp reaches the shuffle.
//
// Compiles with NVRTC alone: no cuda_bf16.h, the bf16 helpers are integer bit operations.

__device__ __forceinline__ unsigned short f32_to_bf16_rne(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);  // NaN: keep sign and payload, quiet
    }
    unsigned int lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;                                 // ties go to the even neighbour
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

extern "C" __global__ void doctor_selftest(const float* __restrict__ x,
                                           unsigned short* __restrict__ bits,
                                           float* __restrict__ warp_sums,
                                           int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float rounded = 0.0f;
    if (i < n) {
        unsigned short b = f32_to_bf16_rne(x[i]);
        bits[i] = b;
        rounded = bf16_to_f32(b);
    }
    float s = warp_sum(rounded);
    if ((threadIdx.x & 31) == 0 && i < n) {
        warp_sums[i >> 5] = s;
    }
}
