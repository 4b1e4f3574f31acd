// embedding.cu: token + position embedding, forward and backward (fp32).
//
// Shapes (N = B*T rows, C channels):
//   tokens [N] u32, wte [padded_vocab, C], wpe [block_size, C], x / dx [N, C].
//
// embedding_forward(x, tokens, wte, wpe, N, T, C)
//   x[n, c] = wte[tokens[n], c] + wpe[n % T, c]
//   Launch: 1-D over N*C elements; block 256, grid ceil(N*C / 256).
//
// embedding_backward_wte(dwte, dx, tokens, N, C)
//   dwte[tokens[n], c] += dx[n, c], with atomicAdd (repeated tokens in a batch add in an
//   unspecified order, so the last bits may differ from run to run).
//   Launch: 1-D over N*C elements; block 256, grid ceil(N*C / 256).
//
// embedding_backward_wpe(dwpe, dx, B, T, C)
//   dwpe[t, c] += sum over b (in order) of dx[b*T + t, c]  (deterministic, no atomics)
//   Launch: 1-D over T*C elements; block 256, grid ceil(T*C / 256).

extern "C" __global__ void embedding_forward(float* __restrict__ x,
                                             const unsigned int* __restrict__ tokens,
                                             const float* __restrict__ wte,
                                             const float* __restrict__ wpe,
                                             int n_rows, int t, int c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n_rows * c;
    if (i >= total) return;
    int n = (int)(i / c);
    int j = (int)(i % c);
    long long tok = tokens[n];
    x[i] = wte[tok * c + j] + wpe[(long long)(n % t) * c + j];
}

extern "C" __global__ void embedding_backward_wte(float* __restrict__ dwte,
                                                  const float* __restrict__ dx,
                                                  const unsigned int* __restrict__ tokens,
                                                  int n_rows, int c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n_rows * c;
    if (i >= total) return;
    int n = (int)(i / c);
    int j = (int)(i % c);
    long long tok = tokens[n];
    atomicAdd(&dwte[tok * c + j], dx[i]);
}

extern "C" __global__ void embedding_backward_wpe(float* __restrict__ dwpe,
                                                  const float* __restrict__ dx,
                                                  int b, int t, int c) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)t * c;
    if (i >= total) return;
    float acc = 0.0f;
    for (int bi = 0; bi < b; bi++) {
        acc += dx[(long long)bi * t * c + i];
    }
    dwpe[i] += acc;
}
