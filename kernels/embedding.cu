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
// embedding_backward_wte(dwte, dx, table, N, C)
//   dwte[tok, c] += dx[n, c] for every row n holding token tok, added in increasing n into
//   the running value (the CPU engine's order, so the same bits). One block owns each
//   token's row of dwte: no atomics, the same bits from run to run.
//   table (u32, 3N + 2 values; built by the host for each micro-batch, see
//   src/engine/cuda/embedding.rs):
//     table[0]                   U, the number of distinct tokens
//     table[1 + u], u <= U       where token u's rows start in `rows` (table[1 + U] = N)
//     table[N + 2 + u], u < U    token u
//     table[2N + 2 + i], i < N   `rows`: the row indices grouped by token, increasing
//                                within a token
//   Launch: grid (N, ceil(G / 256)), block 256, G = ceil((C + 3) / 4) groups of four
//   channels (vectorised access over a dwte row). Blocks x >= U return at once: the grid
//   depends only on the batch shape, so a CUDA graph can replay it for any batch.
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
                                                  const unsigned int* __restrict__ table,
                                                  int n_rows, int c) {
    unsigned int u = blockIdx.x;
    if (u >= __ldg(table)) return;
    const unsigned int* starts = table + 1;
    const unsigned int* tokens = table + n_rows + 2;
    const unsigned int* rows = table + 2 * (long long)n_rows + 2;
    // Every row of dwte (and of dx) has dwte's (dx's) shift when C % 4 == 0.
    int s = vec_shift(dwte, 4);
    bool vec = c % 4 == 0 && vec_shift(dx, 4) == s;
    Group4 g = group4((long long)blockIdx.y * blockDim.x + threadIdx.x, c, s, vec);
    if (g.e0 >= c) return;
    float* dst = dwte + (long long)__ldg(tokens + u) * c;
    float acc[4];
    ld4(acc, dst, g, c);
    unsigned int end = __ldg(starts + u + 1);
    // The loads do not depend on the sums: unrolled, several rows are in flight at once.
#pragma unroll 4
    for (unsigned int i = __ldg(starts + u); i < end; i++) {
        float d[4];
        ld4_ro(d, dx + (long long)__ldg(rows + i) * c, g, c);
#pragma unroll
        for (int e = 0; e < 4; e++) acc[e] += d[e];
    }
    st4(dst, g, c, acc);
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
