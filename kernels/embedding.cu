// embedding.cu: token + position embedding, forward and backward (fp32).
//
// Shapes (N = B*T rows, C channels):
//   tokens [N] u32, wte [padded_vocab, C], wpe [block_size, C], x / dx [N, C].
//
// Four elements per thread (kernels/common.cuh, "vectorised access"): thread t owns flat
// elements [4t, 4t + 4) of the launch's range; 16-byte accesses when C % 4 == 0 and the
// pointers are 16-byte aligned (a group then lies in one row), else element by element.
//
// embedding_forward(x, tokens, wte, wpe, N, T, C)
//   x[n, c] = wte[tokens[n], c] + wpe[n % T, c]
//   Launch: over N*C elements; block 256, grid ceil(ceil((N*C + 3) / 4) / 256) (grid_vec).
//
// embedding_backward_wte(dwte, dx, tokens, N, C)
//   dwte[tokens[n], c] += dx[n, c], with atomicAdd (repeated tokens in a batch add in an
//   unspecified order, so the last bits may differ from run to run).
//   Launch: over N*C elements; block 256, grid ceil(ceil((N*C + 3) / 4) / 256) (grid_vec).
//
// embedding_backward_wpe(dwpe, dx, B, T, C)
//   dwpe[t, c] += sum over b (in order) of dx[b*T + t, c]  (deterministic, no atomics)
//   Launch: over T*C elements; block 256, grid ceil(ceil((T*C + 3) / 4) / 256) (grid_vec).
//   16-byte accesses when dwpe and dx are co-aligned and T*C % 4 == 0.

extern "C" __global__ void embedding_forward(float* __restrict__ x,
                                             const unsigned int* __restrict__ tokens,
                                             const float* __restrict__ wte,
                                             const float* __restrict__ wpe,
                                             int n_rows, int t, int c) {
    long long total = (long long)n_rows * c;
    bool vec = c % 4 == 0 && vec_aligned(x) && vec_aligned(wte) && vec_aligned(wpe);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, total, 0, vec);
    if (g.e0 >= total) return;
    float out[4];
    if (g.full) {
        int n = (int)(g.e0 / c);
        int j = (int)(g.e0 % c);
        long long tok = __ldg(tokens + n);
        Group4 gt = {tok * c + j, true};
        Group4 gp = {(long long)(n % t) * c + j, true};
        float a[4], b[4];
        ld4_ro(a, wte, gt, gt.e0 + 4);
        ld4_ro(b, wpe, gp, gp.e0 + 4);
#pragma unroll
        for (int e = 0; e < 4; e++) out[e] = a[e] + b[e];
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            long long i = g.e0 + e;
            out[e] = 0.0f;
            if (i < total) {
                int n = (int)(i / c);
                int j = (int)(i % c);
                long long tok = tokens[n];
                out[e] = wte[tok * c + j] + wpe[(long long)(n % t) * c + j];
            }
        }
    }
    st4(x, g, total, out);
}

extern "C" __global__ void embedding_backward_wte(float* __restrict__ dwte,
                                                  const float* __restrict__ dx,
                                                  const unsigned int* __restrict__ tokens,
                                                  int n_rows, int c) {
    long long total = (long long)n_rows * c;
    bool vec = c % 4 == 0 && vec_aligned(dx);
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, total, 0, vec);
    if (g.e0 >= total) return;
    float d[4];
    ld4_ro(d, dx, g, total);
    if (g.full) {
        int n = (int)(g.e0 / c);
        int j = (int)(g.e0 % c);
        float* dst = dwte + (long long)__ldg(tokens + n) * c + j;
#pragma unroll
        for (int e = 0; e < 4; e++) atomicAdd(dst + e, d[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            long long i = g.e0 + e;
            if (i < total) {
                int n = (int)(i / c);
                int j = (int)(i % c);
                long long tok = tokens[n];
                atomicAdd(&dwte[tok * c + j], d[e]);
            }
        }
    }
}

extern "C" __global__ void embedding_backward_wpe(float* __restrict__ dwpe,
                                                  const float* __restrict__ dx,
                                                  int b, int t, int c) {
    long long total = (long long)t * c;
    int s = vec_shift(dwpe, 4);
    bool vec = total % 4 == 0 && vec_shift(dx, 4) == s;
    Group4 g = group4((long long)blockIdx.x * blockDim.x + threadIdx.x, total, s, vec);
    if (g.e0 >= total) return;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int bi = 0; bi < b; bi++) {
        float v[4];
        ld4_ro(v, dx + (long long)bi * total, g, total);
#pragma unroll
        for (int e = 0; e < 4; e++) acc[e] += v[e];
    }
    float o[4];
    ld4(o, dwpe, g, total);
#pragma unroll
    for (int e = 0; e < 4; e++) o[e] += acc[e];
    st4(dwpe, g, total, o);
}
