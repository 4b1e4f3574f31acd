// common.cuh: device helpers shared by the kernel families. Every kernels/*.cu is compiled
// with this text in front of it (src/engine/cuda/kernels.rs: kernel_source!), because NVRTC
// runs without toolkit headers and the kernels include nothing.
//
// warp_sum(v), warp_max(v)   butterfly reductions over the 32 lanes of a warp; every lane
//                            gets the result, so every lane must take part.
// bf16_rne(x)                fp32 -> bf16 bits, round to nearest even; NaN stays a (quiet)
//                            NaN, overflow rounds to infinity: the recipe of
//                            src/cuda/bf16.rs::f32_to_bf16_bits, bit for bit (no cuda_bf16.h:
//                            integer bit operations).
// bf16_to_f32(b)             bf16 bits -> fp32 (exact).
// vec_shift, vec_aligned, Group4, group4, ld4, ld4_ro, st4, st4_bf16
//                            four elements per thread with one 16-byte (bf16: 8-byte)
//                            access where the pointers allow, element by element where
//                            not: see "vectorised access" below.
// KERNEL_IN_PART(n)          whether this compilation emits part n of a kernel file that
//                            is compiled as several programs (`#define KERNEL_PARTS <count>`
//                            in the file; the engine compiles it once per part, with
//                            -DKERNEL_PART=0 .. count-1, on separate threads): every part
//                            when KERNEL_PART is not defined (the emulators, the tools).

#ifdef KERNEL_PART
#define KERNEL_IN_PART(n) (KERNEL_PART == (n))
#else
#define KERNEL_IN_PART(n) 1
#endif

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

// ---------------------------------------------------------------- vectorised access
// The memory-bound kernels move four elements per thread with one 16-byte access (float4;
// four bf16 are one 8-byte access), with a scalar fallback that touches the same elements.
//
// A thread owns a group of four consecutive elements. Group g of an array of n elements
// with shift s (0..3) holds elements [4g - s, 4g - s + 4) that lie in [0, n): s is how many
// elements the array's first element sits past a 16-byte boundary (vec_shift), so that
// every whole group is one aligned access. A group is "full" when the kernel may use the
// vector access for it: the pointers the group touches are co-aligned (the same vec_shift)
// and all four elements exist. Other groups (the first and last, or every
// group when the pointers are not co-aligned) load and store element by element; elements
// outside [0, n) are neither read nor written (loads give 0 there).
// The element-to-thread assignment, hence every per-thread summation order, depends only
// on n and s: with s = 0 it is the same in the vector and the scalar path.
// Launch: ceil((n + 3) / 4) threads cover n elements for any shift (kernels.rs: grid_vec).
//
// VEC_ACCESS(p, bytes) marks every vector access; it does nothing on the GPU (where a
// misaligned vector access faults) and checks the alignment in the CPU emulator
// (tools/kernel_emulate).

#ifndef VEC_ACCESS
#define VEC_ACCESS(p, bytes)
#endif

// Elements of `elem_bytes` bytes by which p sits past a (4 * elem_bytes)-byte boundary.
__device__ __forceinline__ int vec_shift(const void* p, int elem_bytes) {
    unsigned long long a = (unsigned long long)p;
    return (int)((a % (4ull * (unsigned long long)elem_bytes)) / (unsigned long long)elem_bytes);
}

// Whether p is 16-byte aligned (a float4 access at p is allowed).
__device__ __forceinline__ bool vec_aligned(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

struct Group4 {
    long long e0;  // index of the group's first element (negative for a shifted first group)
    bool full;     // one vector access per array for this group
};

// Thread t's group over n elements with shift s; vec: whether the pointers are co-aligned.
__device__ __forceinline__ Group4 group4(long long t, long long n, int s, bool vec) {
    Group4 g;
    g.e0 = 4 * t - s;
    g.full = vec && g.e0 >= 0 && g.e0 + 4 <= n;
    return g;
}

__device__ __forceinline__ bool in_range(long long e, long long n) { return e >= 0 && e < n; }

// v[k] = p[e0 + k] for the group's elements (0 elsewhere). p may be written by this kernel
// (plain loads).
__device__ __forceinline__ void ld4(float (&v)[4], const float* p, Group4 g, long long n) {
    if (g.full) {
        VEC_ACCESS(p + g.e0, 16);
        float4 t = *reinterpret_cast<const float4*>(p + g.e0);
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = in_range(g.e0 + k, n) ? p[g.e0 + k] : 0.0f;
}

// As ld4 through the read-only data path (__ldg): only for data no thread of the kernel
// writes while it runs.
__device__ __forceinline__ void ld4_ro(float (&v)[4], const float* p, Group4 g, long long n) {
    if (g.full) {
        VEC_ACCESS(p + g.e0, 16);
        float4 t = __ldg(reinterpret_cast<const float4*>(p + g.e0));
        v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = in_range(g.e0 + k, n) ? __ldg(p + g.e0 + k) : 0.0f;
}

// p[e0 + k] = v[k] for the group's elements.
__device__ __forceinline__ void st4(float* p, Group4 g, long long n, const float (&v)[4]) {
    if (g.full) {
        VEC_ACCESS(p + g.e0, 16);
        *reinterpret_cast<float4*>(p + g.e0) = make_float4(v[0], v[1], v[2], v[3]);
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++)
        if (in_range(g.e0 + k, n)) p[g.e0 + k] = v[k];
}

// v[k] = the bf16 value p[e0 + k] widened to fp32 (exact) for the group's elements (0
// elsewhere): one 8-byte load for a full group (plain loads: p may be written by this
// kernel).
__device__ __forceinline__ void ld4_bf16(float (&v)[4], const unsigned short* p, Group4 g,
                                         long long n) {
    if (g.full) {
        VEC_ACCESS(p + g.e0, 8);
        uint2 t = *reinterpret_cast<const uint2*>(p + g.e0);
        v[0] = bf16_to_f32((unsigned short)(t.x & 0xffffu));  // little endian: element 0 low
        v[1] = bf16_to_f32((unsigned short)(t.x >> 16));
        v[2] = bf16_to_f32((unsigned short)(t.y & 0xffffu));
        v[3] = bf16_to_f32((unsigned short)(t.y >> 16));
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = in_range(g.e0 + k, n) ? bf16_to_f32(p[g.e0 + k]) : 0.0f;
}

// p[e0 + k] = bf16 bits b[k] (one 8-byte access for a full group: the shift of a bf16
// array is counted in 2-byte elements against an 8-byte boundary).
__device__ __forceinline__ void st4_bf16(unsigned short* p, Group4 g, long long n,
                                         const unsigned short (&b)[4]) {
    if (g.full) {
        VEC_ACCESS(p + g.e0, 8);
        uint2 t;
        t.x = (unsigned int)b[0] | ((unsigned int)b[1] << 16);  // little endian: element 0 low
        t.y = (unsigned int)b[2] | ((unsigned int)b[3] << 16);
        *reinterpret_cast<uint2*>(p + g.e0) = t;
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++)
        if (in_range(g.e0 + k, n)) p[g.e0 + k] = b[k];
}
