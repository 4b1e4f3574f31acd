// cast.cu: fp32 -> bf16 copies for the bf16 mode of the CUDA engine (the GEMM operands of
// the linear layers and the LM head, and the bf16 copy of the parameters).
//
// cast_f32_to_bf16(out, in, n)   out[i] = bf16(in[i]), round to nearest even; NaN stays a
//                                (quiet) NaN, overflow rounds to infinity: the recipe of
//                                src/cuda/bf16.rs::f32_to_bf16_bits, bit for bit.
//   out: unsigned short[n] (bf16 bit patterns), in: float[n].
//   Four elements per thread (kernels/common.cuh, "vectorised access": one 16-byte load and
//   one 8-byte store when out and in are co-aligned): block 256 threads,
//   grid ceil(ceil((n + 3) / 4) / 256) (kernels.rs: grid_vec).
//
// cast_bf16_to_f32(out, in, n)  out[i] = in[i] widened (exact). out: float[n], in: bf16 bits.
//   The fp32 copy of a bf16-only activation for a product cuBLASLt cannot run in bf16.
//   Same geometry and vector accesses (an 8-byte load, a 16-byte store) as
//   cast_f32_to_bf16.
//
// The rounding is bf16_rne (kernels/common.cuh).

extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ out,
                                            const float* __restrict__ in, long long n) {
    int s = vec_shift(in, 4);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, n, s,
                      vec_shift(out, 2) == s);
    if (g.e0 >= n) return;
    float v[4];
    ld4_ro(v, in, g, n);
    unsigned short b[4];
#pragma unroll
    for (int k = 0; k < 4; k++) b[k] = bf16_rne(v[k]);
    st4_bf16(out, g, n, b);
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out,
                                            const unsigned short* __restrict__ in, long long n) {
    int s = vec_shift(out, 4);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, n, s,
                      vec_shift(in, 2) == s);
    if (g.e0 >= n) return;
    float v[4];
    ld4_bf16(v, in, g, n);
    st4(out, g, n, v);
}
