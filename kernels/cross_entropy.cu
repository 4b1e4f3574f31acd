// cross_entropy.cu: softmax cross-entropy over the real vocabulary (padded rows of the
// embedding never reach the logits), fused with the logits gradient (fp32, loss in fp64).
//
// Shapes: logits [N, V] row-major (V = vocab_size), targets [N] i32 (-1 = no loss),
//         row_loss [N] f64.
//
// cross_entropy_forward_backward(logits, grad_bf16, row_loss, targets, N, V, grad_k,
//                                write_grad)
//   For a row with target t >= 0: row_loss = (max + log(sum exp(x - max))) - x[t].
//   With write_grad != 0 the gradient grad_k * (softmax(x) - onehot(t)) (grad_k =
//   loss_scale / number of counted rows) overwrites the row in place, or, when grad_bf16
//   is not null, goes to grad_bf16 [N, V] (bf16 bits, the same fp32 value rounded by
//   bf16_rne; the logits are left as they are): the bf16 mode's LM-head products read it
//   in bf16, with no fp32 gradient written and no cast pass. Rows with t = -1: row_loss = 0
//   and, with write_grad, the row's gradient is zeroed.
//   Launch: one block per row; block 256 threads (a power of two), grid N,
//   shared memory 0 (static).
//
// Vectorised access (kernels/common.cuh): a row is split into groups of four logits
// aligned to 16 bytes in memory (the row's shift s: rows start at any alignment when V is
// not a multiple of 4); thread t owns groups t, t + 256, t + 512, ... and takes its
// elements in order for its part of the max and of the sum, then the block combines the
// threads' parts (block_reduce). Deterministic for a given V and buffer alignment. A bf16
// gradient row uses 8-byte stores when it has the logits row's shift (both buffers equally
// aligned), else element by element.

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

// Stores one group of gradients: fp32 in place (gb null) or bf16 to gb (gs: the group for
// the bf16 row, vector only when co-aligned).
__device__ __forceinline__ void xent_store(float* x, unsigned short* gb, Group4 g, Group4 gs,
                                           int v, const float (&gr)[4]) {
    if (gb == nullptr) {
        st4(x, g, v, gr);
        return;
    }
    unsigned short h[4];
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = bf16_rne(gr[e]);
    st4_bf16(gb, gs, v, h);
}

extern "C" __global__ void cross_entropy_forward_backward(float* __restrict__ logits,
                                                          unsigned short* __restrict__ grad_bf16,
                                                          double* __restrict__ row_loss,
                                                          const int* __restrict__ targets,
                                                          int n_rows, int v, float grad_k,
                                                          int write_grad) {
    __shared__ float sh[32];
    int row = blockIdx.x;
    if (row >= n_rows) return;
    float* x = logits + (long long)row * v;
    int shift = vec_shift(x, 4);
    int groups = (v + shift + 3) / 4;
    unsigned short* gb = grad_bf16 ? grad_bf16 + (long long)row * v : nullptr;
    bool gb_vec = gb != nullptr && vec_shift(gb, 2) == shift;
    int tgt = targets[row];
    if (tgt < 0) {
        if (threadIdx.x == 0) row_loss[row] = 0.0;
        if (write_grad) {
            float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int t = threadIdx.x; t < groups; t += blockDim.x)
                xent_store(x, gb, group4(t, v, shift, true), group4(t, v, shift, gb_vec), v, z);
        }
        return;
    }
    // The logits are overwritten below: plain loads, not the read-only path.
    float mx = __int_as_float(0xff800000);
    for (int t = threadIdx.x; t < groups; t += blockDim.x) {
        Group4 g = group4(t, v, shift, true);
        float xv[4];
        ld4(xv, x, g, v);
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (g.full || in_range(g.e0 + e, v)) mx = fmaxf(mx, xv[e]);
    }
    mx = block_reduce(mx, true, sh);
    float s = 0.0f;
    for (int t = threadIdx.x; t < groups; t += blockDim.x) {
        Group4 g = group4(t, v, shift, true);
        float xv[4];
        ld4(xv, x, g, v);
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (g.full || in_range(g.e0 + e, v)) s += expf(xv[e] - mx);
    }
    s = block_reduce(s, false, sh);
    float target_logit = x[tgt];
    if (threadIdx.x == 0) {
        row_loss[row] = ((double)mx + log((double)s)) - (double)target_logit;
    }
    __syncthreads();  // every thread has read x[tgt] before it is overwritten
    if (write_grad) {
        float scale = grad_k / s;
        for (int t = threadIdx.x; t < groups; t += blockDim.x) {
            Group4 g = group4(t, v, shift, true);
            float xv[4];
            ld4(xv, x, g, v);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float gr = expf(xv[e] - mx) * scale;
                if (g.e0 + e == tgt) gr -= grad_k;
                xv[e] = gr;
            }
            xent_store(x, gb, g, group4(t, v, shift, gb_vec), v, xv);
        }
    }
}
