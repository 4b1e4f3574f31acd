// cublas.cpp: a CPU stand-in for NVIDIA's cuBLAS (libcublas.so.13), so that the CUDA engine
// and its tests run on a machine without a GPU (with driver.cpp's libcuda.so.1, where a
// device pointer is a host address and work is done when enqueued). It exports the entry
// points nanogpt loads (src/cuda/cublas.rs) with cublas_v2.h's C signatures:
//
// - cublasGetProperty: version 13.1.0; cublasGetStatusName.
// - cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2 (the stream the products go to),
//   cublasSetMathMode (kept; every mode computes in plain fp32, TF32 is not emulated).
// - Streams: a product is done before its call returns, unless the handle's stream is being
//   captured into a graph (driver.cpp's stream capture): then its arguments are checked now,
//   with the same status codes, alpha and beta are read now, and the product is recorded
//   (gpu_emulate_defer, see cublas_status.h) and computed at each launch of the graph, where
//   the driver first checks that A, B and C (pointers 0, 1, 2) are inside live allocations. On a stream whose
//   capture was invalidated, or on the legacy stream while a blocking stream captures, the
//   call is CUBLAS_STATUS_EXECUTION_FAILED and does nothing.
// - cublasSgemm_v2 and cublasSgemmStridedBatched: column-major
//   C = alpha op(A) op(B) + beta C, op CUBLAS_OP_N, or CUBLAS_OP_T / CUBLAS_OP_C (the same for
//   real data), alpha and beta on the host (the default pointer mode), argument checks as
//   documented (INVALID_VALUE for negative sizes, short leading dimensions, an unknown
//   operation). As in BLAS, C is not read when beta == 0, and A and B are not read when
//   alpha == 0 or k == 0. Each element is one float sum over k in order.
//
// Not emulated: everything else in cuBLAS (other routines, device pointer mode, workspaces).
// Handles are checked against a table of live ones, so that a destroyed or foreign handle
// is CUBLAS_STATUS_NOT_INITIALIZED rather than a crash.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "cublas_status.h"

namespace {

// libraryPropertyType (library_types.h).
enum : int { MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2 };

// cublasOperation_t: N, T, C (Hermitian: the transpose for real data).
constexpr int OP_N = 0;
constexpr int OP_T = 1;
constexpr int OP_C = 2;

// cublasMath_t: DEFAULT, TENSOR_OP, PEDANTIC, TF32_TENSOR_OP, optionally with the
// DISALLOW_REDUCED_PRECISION_REDUCTION flag.
constexpr int MATH_LAST = 3;
constexpr int MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16;

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
};

std::mutex& handles_lock() {
    static std::mutex m;
    return m;
}

std::set<const void*>& handles() {
    static std::set<const void*> h;
    return h;
}

// `p` as a live handle, or null.
Handle* lookup(const void* p) {
    if (p == nullptr) return nullptr;
    std::lock_guard<std::mutex> guard(handles_lock());
    if (handles().count(p) == 0) return nullptr;
    return static_cast<Handle*>(const_cast<void*>(p));
}

// One column-major product C (m x n) = alpha op(A) (m x k) op(B) (k x n) + beta C, sizes
// already checked. `a` is scratch for op(A).
void sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc, std::vector<float>& a) {
    const size_t M = size_t(m), N = size_t(n), K = size_t(k);
    const size_t LDA = size_t(lda), LDB = size_t(ldb), LDC = size_t(ldc);
    if (alpha == 0.0f || k == 0) {
        for (size_t j = 0; j < N; j++) {
            for (size_t i = 0; i < M; i++) {
                float& c = C[i + j * LDC];
                c = beta == 0.0f ? 0.0f : beta * c;
            }
        }
        return;
    }
    // op(A) as a contiguous column-major copy, element (i, q) at i + q * m; then each
    // column of C is a sum of its columns weighted by op(B)[q, j], q in order.
    a.resize(M * K);
    for (size_t i = 0; i < M; i++) {
        for (size_t q = 0; q < K; q++) a[i + q * M] = trans_a ? A[q + i * LDA] : A[i + q * LDA];
    }
    std::vector<float> acc(M);
    for (size_t j = 0; j < N; j++) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (size_t q = 0; q < K; q++) {
            const float bq = trans_b ? B[j + q * LDB] : B[q + j * LDB];
            const float* a_col = &a[q * M];
            for (size_t i = 0; i < M; i++) acc[i] += a_col[i] * bq;
        }
        for (size_t i = 0; i < M; i++) {
            float& c = C[i + j * LDC];
            c = beta == 0.0f ? alpha * acc[i] : alpha * acc[i] + beta * c;
        }
    }
}

bool valid_op(int op) { return op == OP_N || op == OP_T || op == OP_C; }

// cublasSgemmStridedBatched's checks and loop (cublasSgemm_v2 is one batch).
cublasStatus_t sgemm_batched(const char* what, void* handle, int transa, int transb, int m,
                             int n, int k, const float* alpha, const float* A, int lda,
                             long long strideA, const float* B, int ldb, long long strideB,
                             const float* beta, float* C, int ldc, long long strideC,
                             int batchCount) {
    Handle* h = lookup(handle);
    if (h == nullptr) return NOT_INITIALIZED;
    if (!valid_op(transa) || !valid_op(transb)) return INVALID_VALUE;
    if (m < 0 || n < 0 || k < 0 || batchCount < 0) return INVALID_VALUE;
    const bool ta = transa != OP_N, tb = transb != OP_N;
    // Reference BLAS: lda >= max(1, rows of A as stored), likewise B, and ldc >= max(1, m).
    if (lda < std::max(1, ta ? k : m)) return INVALID_VALUE;
    if (ldb < std::max(1, tb ? n : k)) return INVALID_VALUE;
    if (ldc < std::max(1, m)) return INVALID_VALUE;
    if (alpha == nullptr || beta == nullptr) return INVALID_VALUE;
    if (m == 0 || n == 0 || batchCount == 0) return SUCCESS;
    const float al = *alpha, be = *beta;
    if (C == nullptr) return INVALID_VALUE;
    if (al != 0.0f && k > 0 && (A == nullptr || B == nullptr)) return INVALID_VALUE;
    const bool reads_ab = al != 0.0f && k > 0;
    auto work = [=] {
        std::vector<float> scratch;
        for (long long i = 0; i < batchCount; i++) {
            sgemm(ta, tb, m, n, k, al, A + i * strideA, lda, B + i * strideB, ldb, be,
                  C + i * strideC, ldc, scratch);
        }
    };
    return run_on_stream(h->stream, what, {reads_ab ? A : nullptr, reads_ab ? B : nullptr, C},
                         work);
}

}  // namespace

// Only the library's entry points are exported (build.sh hides everything else).
#pragma GCC visibility push(default)
extern "C" {

cublasStatus_t cublasGetProperty(int type, int* value) {
    if (value == nullptr) return INVALID_VALUE;
    switch (type) {
    case MAJOR_VERSION: *value = 13; return SUCCESS;
    case MINOR_VERSION: *value = 1; return SUCCESS;
    case PATCH_LEVEL: *value = 0; return SUCCESS;
    default: return INVALID_VALUE;
    }
}

const char* cublasGetStatusName(cublasStatus_t status) { return status_name(status); }

cublasStatus_t cublasCreate_v2(void** handle) {
    if (handle == nullptr) return INVALID_VALUE;
    Handle* h = new Handle();
    {
        std::lock_guard<std::mutex> guard(handles_lock());
        handles().insert(h);
    }
    *handle = h;
    return SUCCESS;
}

cublasStatus_t cublasDestroy_v2(void* handle) {
    {
        std::lock_guard<std::mutex> guard(handles_lock());
        if (handle == nullptr || handles().erase(handle) == 0) return NOT_INITIALIZED;
    }
    delete static_cast<Handle*>(handle);
    return SUCCESS;
}

cublasStatus_t cublasSetStream_v2(void* handle, void* streamId) {
    Handle* h = lookup(handle);
    if (h == nullptr) return NOT_INITIALIZED;
    h->stream = streamId;
    return SUCCESS;
}

cublasStatus_t cublasSetMathMode(void* handle, int mode) {
    Handle* h = lookup(handle);
    if (h == nullptr) return NOT_INITIALIZED;
    int base = mode & ~MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if (base < 0 || base > MATH_LAST) return INVALID_VALUE;
    h->math_mode = mode;
    return SUCCESS;
}

cublasStatus_t cublasSgemm_v2(void* handle, int transa, int transb, int m, int n, int k,
                              const float* alpha, const float* A, int lda, const float* B,
                              int ldb, const float* beta, float* C, int ldc) {
    return sgemm_batched("cublasSgemm", handle, transa, transb, m, n, k, alpha, A, lda, 0, B,
                         ldb, 0, beta, C, ldc, 0, 1);
}

cublasStatus_t cublasSgemmStridedBatched(void* handle, int transa, int transb, int m, int n,
                                         int k, const float* alpha, const float* A, int lda,
                                         long long strideA, const float* B, int ldb,
                                         long long strideB, const float* beta, float* C,
                                         int ldc, long long strideC, int batchCount) {
    return sgemm_batched("cublasSgemmStridedBatched", handle, transa, transb, m, n, k, alpha, A,
                         lda, strideA, B, ldb, strideB, beta, C, ldc, strideC, batchCount);
}

}  // extern "C"
#pragma GCC visibility pop
