// common.cuh: device helpers shared by the kernel families. Every kernels/*.cu is compiled
// with this text in front of it (src/engine/cuda/kernels.rs: with_prelude), because NVRTC
// runs without toolkit headers and the kernels include nothing.
//
// warp_sum(v), warp_max(v)   butterfly reductions over the 32 lanes of a warp; every lane
//                            gets the result, so every lane must take part.
// bf16_rne(x)                fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet)
//                            NaN, overflow rounds to infinity: the recipe of
//                            src/cuda/bf16.rs::f32_to_bf16_bits, bit for bit (no cuda_bf16.h:
//                            integer bit operations).
// bf16_to_f32(b)             bf16 bits -> fp32 (exact).

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ unsigned short bf16_rne(float x) {
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
