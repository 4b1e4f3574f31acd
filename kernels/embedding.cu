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
//     table[N + 2 + u], u < U    token u (distinct; in any order: the engine puts the
//                                tokens with the most rows first, so that the longest
//                                chains start first)
//     table[2N + 2 + i], i < N   `rows`: the row indices grouped by token, increasing
//                                within a token
//   The block reads its token's row indices WTE_CHUNK at a time into shared memory, and
//   each thread loads WTE_IN_FLIGHT rows of dx before adding them (in row order): a token
//   that fills a tenth of the batch is one block's chain of hundreds of loads.
//   Launch: grid (N, ceil(G / block)), block min(256, 32 * ceil(G / 32)) threads (any
//   number of whole warps up to 256 works), G = ceil((C + vec_shift(dwte, 4)) / 4) groups
//   of four channels (vectorised access over a dwte row: an extra group when dwte is not
//   16-byte aligned). Blocks x >= U return at once: the grid depends only on the batch
//   shape, so a CUDA graph can replay it for any batch.
//
// embedding_backward_wpe(dwpe, dx, B, T, C, accumulate)
//   dwpe[t, c] += sum over b (in order) of dx[b*T + t, c]  (deterministic, no atomics);
//   with accumulate 0, dwpe[t, c] = the sum, dwpe not read (the bits += gives over zeros).
//   Launch: over T*C elements; block 256, grid ceil(ceil((T*C + 3) / 4) / 256) (grid_vec).
//   16-byte accesses when dwpe and dx are co-aligned and T*C % 4 == 0.

#define WTE_CHUNK 256     // row indices staged at once (embedding_backward_wte)
#define WTE_IN_FLIGHT 8   // rows of dx each thread loads before adding them

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

extern "C" __global__ void __launch_bounds__(256)
    embedding_backward_wte(float* __restrict__ dwte, const float* __restrict__ dx,
                           const unsigned int* __restrict__ table, int n_rows, int c) {
    // One chunk of the token's row indices, loaded by the block together (one coalesced
    // load per chunk instead of one broadcast load per row in every thread).
    __shared__ unsigned int chunk[WTE_CHUNK];
    unsigned int u = blockIdx.x;
    if (u >= __ldg(table)) return;  // the whole block
    const unsigned int* starts = table + 1;
    const unsigned int* tokens = table + n_rows + 2;
    const unsigned int* rows = table + 2 * (long long)n_rows + 2;
    // Every row of dwte (and of dx) has dwte's (dx's) shift when C % 4 == 0.
    int s = vec_shift(dwte, 4);
    bool vec = c % 4 == 0 && vec_shift(dx, 4) == s;
    Group4 g = group4((long long)blockIdx.y * blockDim.x + threadIdx.x, c, s, vec);
    // Threads past the row still load indices and reach every barrier.
    bool active = g.e0 < c;
    float* dst = dwte + (long long)__ldg(tokens + u) * c;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) ld4(acc, dst, g, c);
    unsigned int begin = __ldg(starts + u), end = __ldg(starts + u + 1);
    for (unsigned int base = begin; base < end; base += WTE_CHUNK) {
        unsigned int n = end - base < WTE_CHUNK ? end - base : WTE_CHUNK;
        if (base != begin) __syncthreads();  // every thread is done with the last chunk
        for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = __ldg(rows + base + i);
        __syncthreads();
        if (!active) continue;
        // WTE_IN_FLIGHT rows are loaded before any is added, then added in row order: a
        // frequent token is a long chain of loads in one block, bounded by memory latency,
        // so the loads must overlap; the order of the sums stays the row order.
        unsigned int k = 0;
        for (; k + WTE_IN_FLIGHT <= n; k += WTE_IN_FLIGHT) {
            float d[WTE_IN_FLIGHT][4];
#pragma unroll
            for (int r = 0; r < WTE_IN_FLIGHT; r++) ld4_ro(d[r], dx + (long long)chunk[k + r] * c, g, c);
#pragma unroll
            for (int r = 0; r < WTE_IN_FLIGHT; r++)
#pragma unroll
                for (int e = 0; e < 4; e++) acc[e] += d[r][e];
        }
        for (; k < n; k++) {
            float d[4];
            ld4_ro(d, dx + (long long)chunk[k] * c, g, c);
#pragma unroll
            for (int e = 0; e < 4; e++) acc[e] += d[e];
        }
    }
    if (active) st4(dst, g, c, acc);
}

extern "C" __global__ void embedding_backward_wpe(float* __restrict__ dwpe,
                                                  const float* __restrict__ dx,
                                                  int b, int t, int c, int accumulate) {
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
    if (accumulate) {
        float o[4];
        ld4(o, dwpe, g, total);
#pragma unroll
        for (int e = 0; e < 4; e++) acc[e] += o[e];
    }
    st4(dwpe, g, total, acc);
}
