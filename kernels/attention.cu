// attention.cu: the non-GEMM parts of causal self-attention (fp32). The products
// q k^T, P v and their gradients run through cuBLAS strided-batched GEMMs over heads;
// these kernels do the masked softmax and its gradient.
//
// Shapes: att, dp [B*NH, T, T] row-major, one T x T block per (batch, head).
//
// causal_softmax_forward(att, rows, T, scale)
//   In place, per row i of each T x T block (i = row % T): entries j <= i become
//   softmax(att[j] * scale) (max subtracted first), entries j > i become 0.
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(B*NH*T / 8).
//
// causal_softmax_backward(dp, att, rows, T, scale)
//   In place: dp[j] = att[j] * (dp[j] - sum_{k<=i} att[k] dp[k]) * scale for j <= i,
//   0 for j > i (att holds the softmax probabilities before dropout).
//   Launch: one warp per row; block 256 threads (8 rows), grid ceil(B*NH*T / 8).

extern "C" __global__ void causal_softmax_forward(float* __restrict__ att, long long rows,
                                                  int t, float scale) {
    int lane = threadIdx.x & 31;
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int i = (int)(row % t);
    float* a = att + row * t;
    float mx = __int_as_float(0xff800000);  // -inf
    for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, a[j]);
    mx = warp_max(mx) * scale;
    float s = 0.0f;
    for (int j = lane; j <= i; j += 32) {
        float e = expf(a[j] * scale - mx);
        a[j] = e;
        s += e;
    }
    float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < t; j += 32) {
        a[j] = (j <= i) ? a[j] * inv : 0.0f;
    }
}

extern "C" __global__ void causal_softmax_backward(float* __restrict__ dp,
                                                   const float* __restrict__ att,
                                                   long long rows, int t, float scale) {
    int lane = threadIdx.x & 31;
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int i = (int)(row % t);
    float* d = dp + row * t;
    const float* a = att + row * t;
    float dot = 0.0f;
    for (int j = lane; j <= i; j += 32) dot += a[j] * d[j];
    dot = warp_sum(dot);
    for (int j = lane; j < t; j += 32) {
        d[j] = (j <= i) ? a[j] * (d[j] - dot) * scale : 0.0f;
    }
}
