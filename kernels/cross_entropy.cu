// cross_entropy.cu: softmax cross-entropy over the real vocabulary (padded rows of the
// embedding never reach the logits), fused with the logits gradient (fp32 arithmetic, loss
// in fp64), over fp32 or bf16 logits.
//
// Shapes: logits [N, V] row-major with rows LD >= V values apart (V = vocab_size; the
//         engine pads LD to a multiple of 8 so rows start aligned; columns V..LD are
//         neither read nor written), targets [N] i32 (-1 = no loss), row_loss [N] f64.
//
// cross_entropy_forward_backward(logits, grad_bf16, row_loss, targets, N, V, LD, grad_k,
//                                write_grad)
//   fp32 logits. For a row with target t >= 0: row_loss = (max + log(sum exp(x - max))) -
//   x[t]. With write_grad != 0 the gradient grad_k * (softmax(x) - onehot(t)) (grad_k =
//   loss_scale / number of counted rows) overwrites the row in place, or, when grad_bf16
//   is not null, goes to grad_bf16 [N, V] (bf16 bits, the same fp32 value rounded by
//   bf16_rne; the logits are left as they are): the bf16 mode's LM-head products read it
//   in bf16, with no fp32 gradient written and no cast pass. Rows with t = -1: row_loss = 0
//   and, with write_grad, the row's gradient is zeroed.
// cross_entropy_bf16(logits, row_loss, targets, N, V, LD, grad_k, write_grad)
//   The same over bf16 logits (bits; widened exactly, same arithmetic), the gradient
//   rounded by bf16_rne and written over the row in place: the bf16 mode with the LM head
//   writing bf16 logits (engine switch bf16_logits), as torch autocast's logits are bf16.
//   Launch (both): one block per row; block XENT_THREADS (512) threads (any whole number
//   of warps up to 512 works), grid N, shared memory 0 (static).
//
// Two passes over a row: the first finds its max and its sum of exponentials together
// (online, as FlashAttention's softmax: each thread keeps a running max m and the sum of
// exp(x - m), rescaled when m grows; the block then combines the threads' pairs), the
// second writes the gradient. In the first pass each thread loads XENT_IN_FLIGHT groups
// before using them.
// A row of GPT-2's bf16 logits is ~100 KB; with two 512-thread blocks per multiprocessor
// (at most 64 registers, __launch_bounds__) the rows being read at once (~26 MB on 132
// multiprocessors) fit in L2, so the second pass reads its row from L2 and the logits
// cross DRAM about once each way, while each multiprocessor keeps ~32 KB of loads in
// flight.
//
// Vectorised access (kernels/common.cuh): a row is split into groups of four logits
// aligned to 16 bytes in memory (8 for bf16 logits; the row's shift s: rows start at any
// alignment when V is not a multiple of 4); thread t owns groups t, t + B, t + 2B, ... (B
// threads) and takes its elements in order for its part of the max and of the sum, then
// the block combines the threads' parts (block_reduce). Deterministic for a given V, block
// size and buffer alignment. A separate bf16 gradient row uses 8-byte stores when it has the logits row's
// shift (both buffers equally aligned), else element by element.

#define XENT_THREADS 512
#define XENT_IN_FLIGHT 4  // groups of logits each thread loads before using them
#define XENT_NEG_INF __int_as_float(0xff800000)

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

// Loads of a group of logits, and of one logit, as fp32 (plain loads: the row is
// overwritten by its gradient afterwards).
__device__ __forceinline__ void xent_ld4(float (&v)[4], const float* x, Group4 g, int n) {
    ld4(v, x, g, n);
}
__device__ __forceinline__ void xent_ld4(float (&v)[4], const unsigned short* x, Group4 g,
                                         int n) {
    ld4_bf16(v, x, g, n);
}
__device__ __forceinline__ float xent_ld1(const float* x, int i) { return x[i]; }
__device__ __forceinline__ float xent_ld1(const unsigned short* x, int i) {
    return bf16_to_f32(x[i]);
}

// The thread's next XENT_IN_FLIGHT groups of the row, t0, t0 + B, ... (B threads), all
// loaded before any is used, so that they are in flight together (the first pass); groups
// past the row are left as they are (the caller stops at them).
template <typename T>
__device__ __forceinline__ void xent_ld_ahead(float (&xv)[XENT_IN_FLIGHT][4], const T* x, int t0,
                                              int groups, int v, int shift) {
#pragma unroll
    for (int k = 0; k < XENT_IN_FLIGHT; k++) {
        int t = t0 + k * (int)blockDim.x;
        if (t < groups) xent_ld4(xv[k], x, group4(t, v, shift, true), v);
    }
}

// Stores one group of gradients: fp32 logits in place (gb null) or bf16 to gb (gs: the
// group for the bf16 row, vector only when co-aligned); bf16 logits in place.
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
__device__ __forceinline__ void xent_store(unsigned short* x, unsigned short*, Group4 g,
                                           Group4, int v, const float (&gr)[4]) {
    unsigned short h[4];
#pragma unroll
    for (int e = 0; e < 4; e++) h[e] = bf16_rne(gr[e]);
    st4_bf16(x, g, v, h);
}

// One row of either kernel; T is float or unsigned short (bf16 bits), sh the block's
// reduction scratch.
template <typename T>
__device__ void xent_row(T* __restrict__ logits, unsigned short* __restrict__ grad_bf16,
                         double* __restrict__ row_loss, const int* __restrict__ targets,
                         int n_rows, int v, int ld, float grad_k, int write_grad, float* sh) {
    int row = blockIdx.x;
    if (row >= n_rows) return;
    T* x = logits + (long long)row * ld;
    int shift = vec_shift(x, (int)sizeof(T));
    int groups = (v + shift + 3) / 4;
    unsigned short* gb = grad_bf16 ? grad_bf16 + (long long)row * ld : nullptr;
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
    // The thread's running max m and sum s of exp(x - m) (online softmax). A NaN logit
    // makes s NaN (so the loss), as a two-pass sum would; a -inf logit adds nothing.
    float m = XENT_NEG_INF, s = 0.0f;
    // XENT_IN_FLIGHT groups are loaded before any is used, so that each thread has several
    // loads in flight; they are then taken in order (t, t + B, t + 2B, ...).
    for (int t0 = threadIdx.x; t0 < groups; t0 += XENT_IN_FLIGHT * blockDim.x) {
        float xv[XENT_IN_FLIGHT][4];
        xent_ld_ahead(xv, x, t0, groups, v, shift);
#pragma unroll
        for (int k = 0; k < XENT_IN_FLIGHT; k++) {
            int t = t0 + k * (int)blockDim.x;
            if (t >= groups) break;
            Group4 g = group4(t, v, shift, true);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                if (!(g.full || in_range(g.e0 + e, v))) continue;
                float xe = xv[k][e];
                if (xe > m) {
                    s = s * expf(m - xe) + 1.0f;
                    m = xe;
                } else if (!(xe == m && m == XENT_NEG_INF)) {
                    s += expf(xe - m);
                }
            }
        }
    }
    float mx = block_reduce(m, true, sh);
    // Each thread's sum rescaled to the row's max (a thread that saw no finite logit has
    // s = 0, or NaN).
    s = block_reduce(m == XENT_NEG_INF ? s : s * expf(m - mx), false, sh);
    float target_logit = xent_ld1(x, tgt);
    if (threadIdx.x == 0) {
        row_loss[row] = ((double)mx + log((double)s)) - (double)target_logit;
    }
    __syncthreads();  // every thread has read x[tgt] before it is overwritten
    if (write_grad) {
        float scale = grad_k / s;
        // One group at a time: batching these loads as in the first pass makes the compiler
        // split the 16-byte stores of fp32 gradients into four (tests/kernel_emulate.rs
        // checks the PTX); the row comes from L2 here.
        for (int t = threadIdx.x; t < groups; t += blockDim.x) {
            Group4 g = group4(t, v, shift, true);
            float xv[4];
            xent_ld4(xv, x, g, v);
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

extern "C" __global__ void __launch_bounds__(XENT_THREADS, 2)
    cross_entropy_forward_backward(float* __restrict__ logits, unsigned short* __restrict__ grad_bf16,
                                   double* __restrict__ row_loss, const int* __restrict__ targets,
                                   int n_rows, int v, int ld, float grad_k, int write_grad) {
    __shared__ float sh[32];
    xent_row(logits, grad_bf16, row_loss, targets, n_rows, v, ld, grad_k, write_grad, sh);
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS, 2)
    cross_entropy_bf16(unsigned short* __restrict__ logits, double* __restrict__ row_loss,
                       const int* __restrict__ targets, int n_rows, int v, int ld, float grad_k,
                       int write_grad) {
    __shared__ float sh[32];
    xent_row(logits, (unsigned short*)nullptr, row_loss, targets, n_rows, v, ld, grad_k,
             write_grad, sh);
}
