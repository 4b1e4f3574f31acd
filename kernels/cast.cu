// cast.cu: fp32 -> bf16 copies for the bf16 mode of the CUDA engine (the GEMM operands of
// the linear layers and the LM head, and the bf16 copy of the parameters).
//
// cast_f32_to_bf16(out, in, n)   out[i] = bf16(in[i]), round to nearest even; NaN stays a
//                                (quiet) NaN, overflow rounds to infinity: the recipe of
//                                src/cuda/bf16.rs::f32_to_bf16_bits, bit for bit.
//   out: unsigned short[n] (bf16 bit patterns), in: float[n].
//   1-D: block 256 threads, grid ceil(n / 256), one element per thread.
//
// Compiles with NVRTC alone: no cuda_bf16.h, the conversion is integer bit operations.

__device__ __forceinline__ unsigned short cast_bf16_rne(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x0040u);  // NaN: keep sign and payload, quiet
    }
    unsigned int lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;                                 // ties go to the even neighbour
    return (unsigned short)(u >> 16);
}

extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ out,
                                            const float* __restrict__ in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = cast_bf16_rne(in[i]);
}
