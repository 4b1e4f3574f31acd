// cast.cu: fp32 -> bf16 copies for the bf16 mode of the CUDA engine (the GEMM operands of
// the linear layers and the LM head, and the bf16 copy of the parameters).
//
// cast_f32_to_bf16(out, in, n)   out[i] = bf16(in[i]), round to nearest even; NaN stays a
//                                (quiet) NaN, overflow rounds to infinity: the recipe of
//                                src/cuda/bf16.rs::f32_to_bf16_bits, bit for bit.
//   out: unsigned short[n] (bf16 bit patterns), in: float[n].
//   1-D: block 256 threads, grid ceil(n / 256), one element per thread.
//
// The rounding is bf16_rne (kernels/common.cuh).

extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ out,
                                            const float* __restrict__ in, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = bf16_rne(in[i]);
}
