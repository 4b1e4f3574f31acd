// cross_entropy.cu: softmax cross-entropy over the real vocabulary (padded rows of the
// embedding never reach the logits), fused with the logits gradient (fp32, loss in fp64).
//
// Shapes: logits [N, V] row-major (V = vocab_size), targets [N] i32 (-1 = no loss),
//         row_loss [N] f64.
//
// cross_entropy_forward_backward(logits, row_loss, targets, N, V, grad_k, write_grad)
//   For a row with target t >= 0: row_loss = (max + log(sum exp(x - max))) - x[t].
//   With write_grad != 0 the row is overwritten in place by grad_k * (softmax(x) - onehot(t))
//   (grad_k = loss_scale / number of counted rows). Rows with t = -1: row_loss = 0 and,
//   with write_grad, the row is zeroed.
//   Launch: one block per row; block 256 threads (a power of two), grid N,
//   shared memory 0 (static).

#define XENT_THREADS 256

__device__ float block_reduce(float v, bool is_max, float* sh) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = (lane < warps) ? sh[lane] : (is_max ? __int_as_float(0xff800000) : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            float other = __shfl_xor_sync(0xffffffffu, v, o);
            v = is_max ? fmaxf(v, other) : v + other;
        }
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

extern "C" __global__ void cross_entropy_forward_backward(float* __restrict__ logits,
                                                          double* __restrict__ row_loss,
                                                          const int* __restrict__ targets,
                                                          int n_rows, int v, float grad_k,
                                                          int write_grad) {
    __shared__ float sh[32];
    int row = blockIdx.x;
    if (row >= n_rows) return;
    float* x = logits + (long long)row * v;
    int tgt = targets[row];
    if (tgt < 0) {
        if (threadIdx.x == 0) row_loss[row] = 0.0;
        if (write_grad) {
            for (int j = threadIdx.x; j < v; j += blockDim.x) x[j] = 0.0f;
        }
        return;
    }
    float mx = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, x[j]);
    mx = block_reduce(mx, true, sh);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(x[j] - mx);
    s = block_reduce(s, false, sh);
    float target_logit = x[tgt];
    if (threadIdx.x == 0) {
        row_loss[row] = ((double)mx + log((double)s)) - (double)target_logit;
    }
    __syncthreads();  // every thread has read x[tgt] before it is overwritten
    if (write_grad) {
        float scale = grad_k / s;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            float g = expf(x[j] - mx) * scale;
            if (j == tgt) g -= grad_k;
            x[j] = g;
        }
    }
}
