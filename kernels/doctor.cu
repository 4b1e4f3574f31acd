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
// The bf16 helpers and warp_sum come from kernels/common.cuh (compiled in front of this file).

extern "C" __global__ void doctor_selftest(const float* __restrict__ x,
                                           unsigned short* __restrict__ bits,
                                           float* __restrict__ warp_sums,
                                           int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float rounded = 0.0f;
    if (i < n) {
        unsigned short b = bf16_rne(x[i]);
        bits[i] = b;
        rounded = bf16_to_f32(b);
    }
    float s = warp_sum(rounded);
    if ((threadIdx.x & 31) == 0 && i < n) {
        warp_sums[i >> 5] = s;
    }
}
