// cublaslt.cpp: a CPU stand-in for NVIDIA's cuBLASLt (libcublasLt.so.13), so that the CUDA
// engine and its tests run on a machine without a GPU (with driver.cpp's libcuda.so.1, where a
// device pointer is a host address and work is done when enqueued). It exports the entry
// points nanogpt loads (the CublasLtApi block of src/cuda/cublaslt.rs) with cublasLt.h's C
// signatures and computes on the CPU, before returning (or at each launch of a graph, see
// Streams below), what cublasLtMatmul documents:
//
//   D = epilogue(alpha op(A) op(B) + beta C), column-major, op from CUBLASLT_MATMUL_DESC_TRANSA
//   and _TRANSB (CUBLAS_OP_N, or CUBLAS_OP_T / CUBLAS_OP_C, the same for real data).
//
// - Compute type CUBLAS_COMPUTE_32F (or _32F_PEDANTIC), scale type CUDA_R_32F, alpha and beta
//   read as floats (host or device pointer mode: both are host memory here). A and B are both
//   CUDA_R_32F or both CUDA_R_16BF; C and D are CUDA_R_32F, or CUDA_R_16BF with bf16 A and B
//   (the combinations of cuBLASLt's datatype table for these types). bf16 inputs are widened
//   exactly, each output element is a float sum over k in order, and bf16 outputs are rounded
//   to nearest even. With beta == 0, C is not read. C and D may be the same matrix (in place,
//   same layout) or different ones of the same type and size (C's ld may then be 0).
// - Epilogues: DEFAULT, BIAS, RELU, RELU_BIAS, GELU, GELU_BIAS, GELU_AUX, GELU_AUX_BIAS,
//   DGELU, BGRADA, BGRADB, with the conventions of cublasLt.h: the bias has one value per row
//   of D and is added to every column; GELU is the tanh form
//   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); the *_AUX epilogues write the GELU input
//   (after the bias) to EPILOGUE_AUX_POINTER, a rows(D) x cols(D) matrix of leading dimension
//   EPILOGUE_AUX_LD (at least rows(D), a multiple of 8); DGELU multiplies the product by the
//   GELU derivative at that saved input; BGRADA writes, for each row i of D, the sum over k of
//   op(A)[i, :] to BIAS_POINTER, BGRADB for each column j of D the sum over k of op(B)[:, j]
//   (written, not accumulated). Bias and aux vectors have the type BIAS_DATA_TYPE /
//   EPILOGUE_AUX_DATA_TYPE when set (CUDA_R_32F or CUDA_R_16BF), else the type of D.
// - cublasLtMatmulAlgoGetHeuristic offers one algorithm that needs no workspace; preference
//   attributes are accepted and stored but choose nothing. With GPU_EMULATE_LT_NO_BF16=1 it
//   offers none for bf16 inputs (NOT_SUPPORTED), to exercise a caller's fp32 fallback.
//
// Not emulated (CUBLAS_STATUS_NOT_SUPPORTED): other types and compute types, matrix layout
// attributes (order, batches), device-vector pointer modes, the ReLU bit-mask and
// bias-gradient-with-activation epilogues, and descriptor attributes other than those
// listed in MatmulDesc below. Handles and descriptors are checked against a table of live
// objects, so that a destroyed or foreign one is an error (NOT_INITIALIZED for a handle,
// INVALID_VALUE for a descriptor) rather than a crash. Element pointers must be aligned to
// their element size. The workspace argument is ignored.
//
// Streams: the product is done before cublasLtMatmul returns, unless its stream argument is
// being captured into a graph (driver.cpp's stream capture). Then the arguments are checked
// now, with the same status codes, and the product is recorded (gpu_emulate_defer, see
// cublas_status.h) with everything it reads copied: the descriptors' and layouts' contents
// (the caller may change or destroy them after the call), alpha and beta (read at each
// launch instead in device pointer mode, as a GPU reads them), and the pointers. It is
// computed at each launch of the graph, where the driver first checks that A, B, C, D and
// the bias and aux vectors are inside live allocations (a failure names them by position:
// pointer 0 is A, then B, C, D, bias, aux, and alpha and beta in device pointer mode). On a stream whose capture was
// invalidated, or on the legacy stream while a blocking stream captures, the call is
// CUBLAS_STATUS_EXECUTION_FAILED and does nothing.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cublas_status.h"

typedef struct {
    uint64_t data[8];
} cublasLtMatmulAlgo_t;

typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96,
              "cublasLtMatmulHeuristicResult_t is 96 bytes, as in cublasLt.h");

namespace {

// cudaDataType_t (library_types.h); -1 is "unset" for the bias and aux data types.
constexpr int32_t R_32F = 0;
constexpr int32_t R_16BF = 14;
constexpr int32_t TYPE_OF_D = -1;

// cublasComputeType_t (cublas_api.h).
constexpr int32_t COMPUTE_32F = 68;
constexpr int32_t COMPUTE_32F_PEDANTIC = 69;

// cublasOperation_t: N, then T and C (Hermitian: the transpose for real data), then CONJG.
constexpr int32_t OP_N = 0;
constexpr int32_t OP_CONJG = 3;

// cublasLtPointerMode_t: HOST, DEVICE, then the device-vector modes (up to 4).
constexpr int32_t POINTER_MODE_HOST = 0;
constexpr int32_t POINTER_MODE_DEVICE = 1;
constexpr int32_t POINTER_MODE_LAST = 4;

// cublasLtMatmulDescAttributes_t.
enum : int {
    DESC_COMPUTE_TYPE = 0,
    DESC_SCALE_TYPE = 1,
    DESC_POINTER_MODE = 2,
    DESC_TRANSA = 3,
    DESC_TRANSB = 4,
    DESC_TRANSC = 5,
    DESC_EPILOGUE = 7,
    DESC_BIAS_POINTER = 8,
    DESC_BIAS_BATCH_STRIDE = 10,
    DESC_EPILOGUE_AUX_POINTER = 11,
    DESC_EPILOGUE_AUX_LD = 12,
    DESC_EPILOGUE_AUX_BATCH_STRIDE = 13,
    DESC_ALPHA_VECTOR_BATCH_STRIDE = 14,
    DESC_SM_COUNT_TARGET = 15,
    DESC_EPILOGUE_AUX_DATA_TYPE = 22,
    DESC_BIAS_DATA_TYPE = 26,
};

// cublasLtMatmulPreferenceAttributes_t.
enum : int {
    PREF_SEARCH_MODE = 0,
    PREF_MAX_WORKSPACE_BYTES = 1,
    PREF_REDUCTION_SCHEME_MASK = 3,
    PREF_MIN_ALIGNMENT_A_BYTES = 5,
    PREF_MIN_ALIGNMENT_B_BYTES = 6,
    PREF_MIN_ALIGNMENT_C_BYTES = 7,
    PREF_MIN_ALIGNMENT_D_BYTES = 8,
    PREF_MAX_WAVES_COUNT = 9,
    PREF_IMPL_MASK = 12,
};

// cublasLtEpilogue_t.
enum : uint32_t {
    EPILOGUE_DEFAULT = 1,
    EPILOGUE_RELU = 2,
    EPILOGUE_BIAS = 4,
    EPILOGUE_RELU_BIAS = 2 | 4,
    EPILOGUE_GELU = 32,
    EPILOGUE_GELU_AUX = 32 | 128,
    EPILOGUE_GELU_BIAS = 32 | 4,
    EPILOGUE_GELU_AUX_BIAS = 32 | 128 | 4,
    EPILOGUE_DGELU = 64 | 128,
    EPILOGUE_BGRADA = 256,
    EPILOGUE_BGRADB = 512,
};

// What an epilogue does, step by step.
struct EpilogueSteps {
    bool add_bias = false;  // + bias[row], before any activation
    bool save_aux = false;  // write the activation's input to the aux matrix
    bool relu = false;
    bool gelu = false;
    bool dgelu = false;     // multiply by gelu'(aux)
    bool bgrad_a = false;   // bias[i] = sum over k of op(A)[i, :]
    bool bgrad_b = false;   // bias[j] = sum over k of op(B)[:, j]
    bool uses_bias() const { return add_bias || bgrad_a || bgrad_b; }
    bool uses_aux() const { return save_aux || dgelu; }
};

// The steps of `epilogue`; false when it is not emulated.
bool epilogue_steps(uint32_t epilogue, EpilogueSteps* s) {
    *s = EpilogueSteps();
    switch (epilogue) {
    case EPILOGUE_DEFAULT: return true;
    case EPILOGUE_RELU: s->relu = true; return true;
    case EPILOGUE_BIAS: s->add_bias = true; return true;
    case EPILOGUE_RELU_BIAS: s->add_bias = s->relu = true; return true;
    case EPILOGUE_GELU: s->gelu = true; return true;
    case EPILOGUE_GELU_BIAS: s->add_bias = s->gelu = true; return true;
    case EPILOGUE_GELU_AUX: s->gelu = s->save_aux = true; return true;
    case EPILOGUE_GELU_AUX_BIAS: s->add_bias = s->gelu = s->save_aux = true; return true;
    case EPILOGUE_DGELU: s->dgelu = true; return true;
    case EPILOGUE_BGRADA: s->bgrad_a = true; return true;
    case EPILOGUE_BGRADB: s->bgrad_b = true; return true;
    default: return false;
    }
}

// ------------------------------------------------------------------ objects

struct Handle {
    int unused = 0;
};

// A matmul descriptor: every attribute this emulation accepts, with cuBLASLt's defaults.
struct MatmulDesc {
    int32_t compute_type = COMPUTE_32F;
    int32_t scale_type = R_32F;
    int32_t pointer_mode = POINTER_MODE_HOST;
    int32_t transa = OP_N;
    int32_t transb = OP_N;
    int32_t transc = OP_N;
    uint32_t epilogue = EPILOGUE_DEFAULT;
    const void* bias = nullptr;
    int64_t bias_batch_stride = 0;
    void* aux = nullptr;
    int64_t aux_ld = 0;
    int64_t aux_batch_stride = 0;
    int64_t alpha_vector_batch_stride = 0;
    int32_t sm_count_target = 0;
    int32_t aux_type = TYPE_OF_D;
    int32_t bias_type = TYPE_OF_D;
};

// A column-major matrix: element (i, j) is at i + j * ld.
struct Layout {
    int32_t type = R_32F;
    uint64_t rows = 0;
    uint64_t cols = 0;
    int64_t ld = 0;
};

struct Preference {
    uint32_t search_mode = 0;
    uint64_t max_workspace_bytes = 0;
    uint32_t reduction_scheme_mask = 0xff;
    uint32_t min_alignment[4] = {256, 256, 256, 256};  // A, B, C, D
    float max_waves_count = 0.0f;
    uint64_t impl_mask = ~uint64_t(0);
};

// The live objects, so that a destroyed, foreign or null one is refused, not dereferenced.
enum class Kind { Handle, MatmulDesc, Layout, Preference };

std::mutex& registry_lock() {
    static std::mutex m;
    return m;
}

std::map<const void*, Kind>& registry() {
    static std::map<const void*, Kind> r;
    return r;
}

template <class T>
void remember(T* obj, Kind kind) {
    std::lock_guard<std::mutex> guard(registry_lock());
    registry()[obj] = kind;
}

// `p` as a live object of `kind`, or null.
template <class T>
T* lookup(const void* p, Kind kind) {
    if (p == nullptr) return nullptr;
    std::lock_guard<std::mutex> guard(registry_lock());
    auto it = registry().find(p);
    if (it == registry().end() || it->second != kind) return nullptr;
    return static_cast<T*>(const_cast<void*>(p));
}

// Deletes a live object of `kind`; false if `p` is not one.
template <class T>
bool forget(void* p, Kind kind) {
    if (p == nullptr) return false;
    {
        std::lock_guard<std::mutex> guard(registry_lock());
        auto it = registry().find(p);
        if (it == registry().end() || it->second != kind) return false;
        registry().erase(it);
    }
    delete static_cast<T*>(p);
    return true;
}

template <class T>
cublasStatus_t create(void** out, Kind kind, const T& init) {
    if (out == nullptr) return INVALID_VALUE;
    T* obj = new T(init);
    remember(obj, kind);
    *out = obj;
    return SUCCESS;
}

// Reads an attribute value of type T: cublasLt.h answers INVALID_VALUE when buf is null or
// sizeInBytes is not the size of the attribute.
template <class T>
cublasStatus_t read_attribute(const void* buf, size_t size, T* value) {
    if (buf == nullptr || size != sizeof(T)) return INVALID_VALUE;
    std::memcpy(value, buf, sizeof(T));
    return SUCCESS;
}

// Reads a cublasOperation_t attribute (int32_t); INVALID_VALUE for a value not in the enum.
cublasStatus_t read_operation(const void* buf, size_t size, int32_t* op) {
    int32_t value;
    cublasStatus_t s = read_attribute(buf, size, &value);
    if (s != SUCCESS) return s;
    if (value < OP_N || value > OP_CONJG) return INVALID_VALUE;
    *op = value;
    return SUCCESS;
}

// An algorithm from cublasLtMatmulAlgoGetHeuristic carries this in data[0].
constexpr uint64_t ALGO_TAG = 0x4350554d41544d55ull;  // "CPUMATMU"

// ------------------------------------------------------------------ elements

size_t element_size(int32_t type) { return type == R_16BF ? 2 : 4; }

bool is_float_type(int32_t type) { return type == R_32F || type == R_16BF; }

float bf16_to_float(uint16_t h) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Rounds to the nearest bf16, ties to even; NaN stays NaN (quiet).
uint16_t float_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

// Element `index` of an array of `type` at `base`.
float load(const void* base, int32_t type, size_t index) {
    const char* p = static_cast<const char*>(base) + index * element_size(type);
    if (type == R_16BF) {
        uint16_t h;
        std::memcpy(&h, p, sizeof h);
        return bf16_to_float(h);
    }
    float f;
    std::memcpy(&f, p, sizeof f);
    return f;
}

void store(void* base, int32_t type, size_t index, float value) {
    char* p = static_cast<char*>(base) + index * element_size(type);
    if (type == R_16BF) {
        uint16_t h = float_to_bf16(value);
        std::memcpy(p, &h, sizeof h);
    } else {
        std::memcpy(p, &value, sizeof value);
    }
}

bool aligned(const void* p, int32_t type) {
    return reinterpret_cast<uintptr_t>(p) % element_size(type) == 0;
}

// ------------------------------------------------------------------ GELU

const float SQRT_2_OVER_PI = 0.7978845608028654f;
const float GELU_C = 0.044715f;

float gelu(float x) {
    return 0.5f * x * (1.0f + std::tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x)));
}

// d/dx of gelu above.
float gelu_grad(float x) {
    float t = std::tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    return 0.5f * (1.0f + t) +
           0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * x * x);
}

// ------------------------------------------------------------------ the product

// A checked problem: D (m x n) = op(A) (m x k) op(B) (k x n), with the epilogue's steps and
// the types of its vectors.
struct Problem {
    const MatmulDesc* op;
    const Layout* a;
    const Layout* b;
    const Layout* c;
    const Layout* d;
    bool trans_a;
    bool trans_b;
    uint64_t m, n, k;
    EpilogueSteps steps;
    int32_t bias_type;
    int32_t aux_type;
};

bool same_layout(const Layout& x, const Layout& y) {
    return x.type == y.type && x.rows == y.rows && x.cols == y.cols && x.ld == y.ld;
}

// Checks what cublasLtMatmulAlgoGetHeuristic and cublasLtMatmul both check (no pointers):
// NOT_SUPPORTED for a valid configuration this emulation does not run, INVALID_VALUE for
// one that is inconsistent.
cublasStatus_t check_problem(const MatmulDesc& op, const Layout& a, const Layout& b,
                             const Layout& c, const Layout& d, Problem* p) {
    if (op.compute_type != COMPUTE_32F && op.compute_type != COMPUTE_32F_PEDANTIC)
        return NOT_SUPPORTED;
    if (op.scale_type != R_32F) return NOT_SUPPORTED;
    if (op.pointer_mode != POINTER_MODE_HOST && op.pointer_mode != POINTER_MODE_DEVICE)
        return NOT_SUPPORTED;
    if (op.transa == OP_CONJG || op.transb == OP_CONJG || op.transc != OP_N)
        return NOT_SUPPORTED;

    // Types: cublasLtMatmul's table for CUBLAS_COMPUTE_32F with a CUDA_R_32F scale type.
    if (!is_float_type(a.type) || !is_float_type(b.type) || !is_float_type(c.type) ||
        !is_float_type(d.type))
        return NOT_SUPPORTED;
    if (a.type != b.type) return NOT_SUPPORTED;
    if (a.type == R_32F && d.type != R_32F) return NOT_SUPPORTED;
    if (c.type != d.type) return INVALID_VALUE;

    // Sizes: "normally only values that can be expressed as int32_t are supported".
    for (const Layout* l : {&a, &b, &c, &d}) {
        if (l->rows > INT32_MAX || l->cols > INT32_MAX) return NOT_SUPPORTED;
    }
    bool ta = op.transa != OP_N;
    bool tb = op.transb != OP_N;
    uint64_t m = d.rows, n = d.cols;
    uint64_t a_rows = ta ? a.cols : a.rows, k = ta ? a.rows : a.cols;
    uint64_t b_rows = tb ? b.cols : b.rows, b_cols = tb ? b.rows : b.cols;
    if (a_rows != m || b_rows != k || b_cols != n) return INVALID_VALUE;
    if (c.rows != m || c.cols != n) return INVALID_VALUE;

    // Leading dimensions: at least the rows (C's may be 0 to broadcast one column).
    for (const Layout* l : {&a, &b, &d}) {
        if (l->ld < 0 || uint64_t(l->ld) < l->rows) return INVALID_VALUE;
    }
    if (c.ld < 0 || (c.ld != 0 && uint64_t(c.ld) < c.rows)) return INVALID_VALUE;

    EpilogueSteps steps;
    if (!epilogue_steps(op.epilogue, &steps)) return NOT_SUPPORTED;
    int32_t bias_type = op.bias_type == TYPE_OF_D ? d.type : op.bias_type;
    int32_t aux_type = op.aux_type == TYPE_OF_D ? d.type : op.aux_type;
    if (steps.uses_bias() && !is_float_type(bias_type)) return NOT_SUPPORTED;
    if (steps.uses_aux()) {
        if (!is_float_type(aux_type)) return NOT_SUPPORTED;
        // cublasLt.h: the GELU input's leading dimension "must be divisible by 8 and be no
        // less than the number of rows in the output matrix".
        if (op.aux_ld < 0 || uint64_t(op.aux_ld) < m || op.aux_ld % 8 != 0) return INVALID_VALUE;
    }

    *p = Problem{&op, &a, &b, &c, &d, ta, tb, m, n, k, steps, bias_type, aux_type};
    return SUCCESS;
}

// Runs a checked problem. op(A) is widened once into a contiguous column-major float copy;
// each column of D is then accumulated as a sum of columns of op(A) weighted by op(B)[q, j]
// (q = 0, 1, ..., in order, so every element is one float sum over k in order), and the
// epilogue applied element by element as the column is written.
void run(const Problem& p, float alpha, float beta, const void* A, const void* B,
         const void* C, void* D) {
    const size_t m = p.m, n = p.n, k = p.k;
    const Layout &la = *p.a, &lb = *p.b, &lc = *p.c, &ld = *p.d;
    const MatmulDesc& op = *p.op;
    const EpilogueSteps& s = p.steps;

    std::vector<float> a(m * k);  // op(A), element (i, q) at i + q * m
    for (size_t i = 0; i < m; i++) {
        for (size_t q = 0; q < k; q++) {
            size_t at = p.trans_a ? q + i * size_t(la.ld) : i + q * size_t(la.ld);
            a[i + q * m] = load(A, la.type, at);
        }
    }

    std::vector<float> b(k);    // column j of op(B)
    std::vector<float> acc(m);  // column j of op(A) op(B)
    for (size_t j = 0; j < n; j++) {
        for (size_t q = 0; q < k; q++) {
            size_t at = p.trans_b ? j + q * size_t(lb.ld) : q + j * size_t(lb.ld);
            b[q] = load(B, lb.type, at);
        }
        if (s.bgrad_b) {
            float sum = 0.0f;
            for (size_t q = 0; q < k; q++) sum += b[q];
            store(const_cast<void*>(op.bias), p.bias_type, j, sum);
        }

        std::fill(acc.begin(), acc.end(), 0.0f);
        for (size_t q = 0; q < k; q++) {
            const float* a_col = &a[q * m];
            const float bq = b[q];
            for (size_t i = 0; i < m; i++) acc[i] += a_col[i] * bq;
        }

        for (size_t i = 0; i < m; i++) {
            float x = alpha * acc[i];
            if (beta != 0.0f) x += beta * load(C, lc.type, i + j * size_t(lc.ld));
            if (s.add_bias) x += load(op.bias, p.bias_type, i);
            if (s.save_aux) store(op.aux, p.aux_type, i + j * size_t(op.aux_ld), x);
            if (s.relu) x = x > 0.0f ? x : 0.0f;
            if (s.gelu) x = gelu(x);
            if (s.dgelu) x *= gelu_grad(load(op.aux, p.aux_type, i + j * size_t(op.aux_ld)));
            store(D, ld.type, i + j * size_t(ld.ld), x);
        }
    }

    if (s.bgrad_a) {
        std::vector<float> sum(m, 0.0f);
        for (size_t q = 0; q < k; q++) {
            for (size_t i = 0; i < m; i++) sum[i] += a[i + q * m];
        }
        for (size_t i = 0; i < m; i++) store(const_cast<void*>(op.bias), p.bias_type, i, sum[i]);
    }
}

}  // namespace

// ------------------------------------------------------------------ entry points

// Only the library's entry points are exported (build.sh hides everything else).
#pragma GCC visibility push(default)
extern "C" {

size_t cublasLtGetVersion(void) { return 130100; }

const char* cublasLtGetStatusName(cublasStatus_t status) { return status_name(status); }

cublasStatus_t cublasLtCreate(void** handle) {
    return create(handle, Kind::Handle, Handle());
}

cublasStatus_t cublasLtDestroy(void* handle) {
    return forget<Handle>(handle, Kind::Handle) ? SUCCESS : NOT_INITIALIZED;
}

cublasStatus_t cublasLtMatmulDescCreate(void** matmulDesc, int computeType, int scaleType) {
    MatmulDesc init;
    init.compute_type = computeType;
    init.scale_type = scaleType;
    return create(matmulDesc, Kind::MatmulDesc, init);
}

cublasStatus_t cublasLtMatmulDescDestroy(void* matmulDesc) {
    return forget<MatmulDesc>(matmulDesc, Kind::MatmulDesc) ? SUCCESS : INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(void* matmulDesc, int attr, const void* buf,
                                              size_t sizeInBytes) {
    MatmulDesc* d = lookup<MatmulDesc>(matmulDesc, Kind::MatmulDesc);
    if (d == nullptr) return INVALID_VALUE;
    // Validate into a copy, so that a refused value leaves the descriptor as it was.
    MatmulDesc v = *d;
    cublasStatus_t s;
    switch (attr) {
    case DESC_COMPUTE_TYPE: s = read_attribute(buf, sizeInBytes, &v.compute_type); break;
    case DESC_SCALE_TYPE: s = read_attribute(buf, sizeInBytes, &v.scale_type); break;
    case DESC_POINTER_MODE:
        s = read_attribute(buf, sizeInBytes, &v.pointer_mode);
        if (s == SUCCESS && (v.pointer_mode < 0 || v.pointer_mode > POINTER_MODE_LAST))
            s = INVALID_VALUE;
        break;
    case DESC_TRANSA: s = read_operation(buf, sizeInBytes, &v.transa); break;
    case DESC_TRANSB: s = read_operation(buf, sizeInBytes, &v.transb); break;
    case DESC_TRANSC: s = read_operation(buf, sizeInBytes, &v.transc); break;
    case DESC_EPILOGUE: s = read_attribute(buf, sizeInBytes, &v.epilogue); break;
    case DESC_BIAS_POINTER: s = read_attribute(buf, sizeInBytes, &v.bias); break;
    case DESC_BIAS_BATCH_STRIDE: s = read_attribute(buf, sizeInBytes, &v.bias_batch_stride); break;
    case DESC_EPILOGUE_AUX_POINTER: s = read_attribute(buf, sizeInBytes, &v.aux); break;
    case DESC_EPILOGUE_AUX_LD: s = read_attribute(buf, sizeInBytes, &v.aux_ld); break;
    case DESC_EPILOGUE_AUX_BATCH_STRIDE:
        s = read_attribute(buf, sizeInBytes, &v.aux_batch_stride);
        break;
    case DESC_ALPHA_VECTOR_BATCH_STRIDE:
        s = read_attribute(buf, sizeInBytes, &v.alpha_vector_batch_stride);
        break;
    case DESC_SM_COUNT_TARGET: s = read_attribute(buf, sizeInBytes, &v.sm_count_target); break;
    case DESC_EPILOGUE_AUX_DATA_TYPE: s = read_attribute(buf, sizeInBytes, &v.aux_type); break;
    case DESC_BIAS_DATA_TYPE: s = read_attribute(buf, sizeInBytes, &v.bias_type); break;
    default: s = NOT_SUPPORTED; break;
    }
    if (s == SUCCESS) *d = v;
    return s;
}

cublasStatus_t cublasLtMatrixLayoutCreate(void** matLayout, int type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
    Layout init;
    init.type = type;
    init.rows = rows;
    init.cols = cols;
    init.ld = ld;
    return create(matLayout, Kind::Layout, init);
}

cublasStatus_t cublasLtMatrixLayoutDestroy(void* matLayout) {
    return forget<Layout>(matLayout, Kind::Layout) ? SUCCESS : INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(void** pref) {
    return create(pref, Kind::Preference, Preference());
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(void* pref) {
    return forget<Preference>(pref, Kind::Preference) ? SUCCESS : INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf,
                                                    size_t sizeInBytes) {
    Preference* p = lookup<Preference>(pref, Kind::Preference);
    if (p == nullptr) return INVALID_VALUE;
    switch (attr) {
    case PREF_SEARCH_MODE: return read_attribute(buf, sizeInBytes, &p->search_mode);
    case PREF_MAX_WORKSPACE_BYTES:
        return read_attribute(buf, sizeInBytes, &p->max_workspace_bytes);
    case PREF_REDUCTION_SCHEME_MASK:
        return read_attribute(buf, sizeInBytes, &p->reduction_scheme_mask);
    case PREF_MIN_ALIGNMENT_A_BYTES:
    case PREF_MIN_ALIGNMENT_B_BYTES:
    case PREF_MIN_ALIGNMENT_C_BYTES:
    case PREF_MIN_ALIGNMENT_D_BYTES:
        return read_attribute(buf, sizeInBytes,
                              &p->min_alignment[attr - PREF_MIN_ALIGNMENT_A_BYTES]);
    case PREF_MAX_WAVES_COUNT: return read_attribute(buf, sizeInBytes, &p->max_waves_count);
    case PREF_IMPL_MASK: return read_attribute(buf, sizeInBytes, &p->impl_mask);
    default: return INVALID_VALUE;
    }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void* lightHandle, void* operationDesc,
                                              void* Adesc, void* Bdesc, void* Cdesc,
                                              void* Ddesc, void* preference,
                                              int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int* returnAlgoCount) {
    if (lookup<Handle>(lightHandle, Kind::Handle) == nullptr) return NOT_INITIALIZED;
    const MatmulDesc* op = lookup<MatmulDesc>(operationDesc, Kind::MatmulDesc);
    const Layout* a = lookup<Layout>(Adesc, Kind::Layout);
    const Layout* b = lookup<Layout>(Bdesc, Kind::Layout);
    const Layout* d = lookup<Layout>(Ddesc, Kind::Layout);
    const Layout* c = Cdesc == nullptr ? d : lookup<Layout>(Cdesc, Kind::Layout);
    if (op == nullptr || a == nullptr || b == nullptr || c == nullptr || d == nullptr)
        return INVALID_VALUE;
    if (lookup<Preference>(preference, Kind::Preference) == nullptr) return INVALID_VALUE;
    if (requestedAlgoCount <= 0 || heuristicResultsArray == nullptr || returnAlgoCount == nullptr)
        return INVALID_VALUE;
    *returnAlgoCount = 0;
    Problem p;
    cublasStatus_t s = check_problem(*op, *a, *b, *c, *d, &p);
    if (s != SUCCESS) return s;
    // GPU_EMULATE_LT_NO_BF16=1: no algorithm for bf16 inputs, as the real library answers
    // for shapes it cannot run, so that a caller's fallback can be exercised.
    const char* no_bf16 = std::getenv("GPU_EMULATE_LT_NO_BF16");
    if (no_bf16 && std::strcmp(no_bf16, "1") == 0 && a->type == R_16BF) return NOT_SUPPORTED;
    cublasLtMatmulHeuristicResult_t r;
    std::memset(&r, 0, sizeof r);
    r.algo.data[0] = ALGO_TAG;
    r.workspaceSize = 0;
    r.state = SUCCESS;
    r.wavesCount = 1.0f;
    heuristicResultsArray[0] = r;
    *returnAlgoCount = 1;
    return SUCCESS;
}

cublasStatus_t cublasLtMatmul(void* lightHandle, void* computeDesc, const void* alpha,
                              const void* A, void* Adesc, const void* B, void* Bdesc,
                              const void* beta, const void* C, void* Cdesc, void* D,
                              void* Ddesc, const cublasLtMatmulAlgo_t* algo, void* workspace,
                              size_t workspaceSizeInBytes, void* stream) {
    (void)workspace;
    (void)workspaceSizeInBytes;
    if (lookup<Handle>(lightHandle, Kind::Handle) == nullptr) return NOT_INITIALIZED;
    const MatmulDesc* op = lookup<MatmulDesc>(computeDesc, Kind::MatmulDesc);
    const Layout* a = lookup<Layout>(Adesc, Kind::Layout);
    const Layout* b = lookup<Layout>(Bdesc, Kind::Layout);
    const Layout* d = lookup<Layout>(Ddesc, Kind::Layout);
    const Layout* c = Cdesc == nullptr ? d : lookup<Layout>(Cdesc, Kind::Layout);
    if (op == nullptr || a == nullptr || b == nullptr || c == nullptr || d == nullptr)
        return INVALID_VALUE;
    Problem p;
    cublasStatus_t s = check_problem(*op, *a, *b, *c, *d, &p);
    if (s != SUCCESS) return s;
    // algo may be null (an implicit heuristic query); otherwise one the heuristic gave.
    if (algo != nullptr && algo->data[0] != ALGO_TAG) return INVALID_VALUE;
    if (alpha == nullptr || beta == nullptr) return INVALID_VALUE;
    float alpha_f, beta_f;
    std::memcpy(&alpha_f, alpha, sizeof alpha_f);
    std::memcpy(&beta_f, beta, sizeof beta_f);

    // Pointers: present where they are read or written, aligned to their elements.
    bool product = p.m > 0 && p.n > 0 && p.k > 0;
    if ((product || p.steps.bgrad_a) && (A == nullptr || !aligned(A, a->type)))
        return INVALID_VALUE;
    if ((product || p.steps.bgrad_b) && (B == nullptr || !aligned(B, b->type)))
        return INVALID_VALUE;
    if (p.m > 0 && p.n > 0) {
        if (D == nullptr || !aligned(D, d->type)) return INVALID_VALUE;
        if (beta_f != 0.0f && (C == nullptr || !aligned(C, c->type))) return INVALID_VALUE;
    }
    // In place: "C == D and Cdesc == Ddesc".
    if (C != nullptr && C == D && !same_layout(*c, *d)) return INVALID_VALUE;
    if (p.steps.uses_bias() && (op->bias == nullptr || !aligned(op->bias, p.bias_type)))
        return INVALID_VALUE;
    if (p.steps.uses_aux() && (op->aux == nullptr || !aligned(op->aux, p.aux_type)))
        return INVALID_VALUE;

    // Everything the product reads, by value: the caller may change or destroy the
    // descriptors once the call has returned, and a recorded product runs later. alpha and
    // beta are taken now in host pointer mode, and read when the product runs in device
    // pointer mode, as on a GPU.
    struct Matmul {
        MatmulDesc op;
        Layout a, b, c, d;
        Problem p;
        const void *alpha_p, *beta_p;
        float alpha, beta;
        const void *A, *B, *C;
        void* D;
        void operator()() const {
            Problem q = p;
            q.op = &op;
            q.a = &a;
            q.b = &b;
            q.c = &c;
            q.d = &d;
            float al = alpha, be = beta;
            if (op.pointer_mode == POINTER_MODE_DEVICE) {
                std::memcpy(&al, alpha_p, sizeof al);
                std::memcpy(&be, beta_p, sizeof be);
            }
            run(q, al, be, A, B, C, D);
        }
    };
    Matmul work{*op, *a, *b, *c, *d, p, alpha, beta, alpha_f, beta_f, A, B, C, D};
    bool device_scalars = op->pointer_mode == POINTER_MODE_DEVICE;
    return run_on_stream(stream, "cublasLtMatmul",
                         {product || p.steps.bgrad_a ? A : nullptr,
                          product || p.steps.bgrad_b ? B : nullptr,
                          beta_f != 0.0f ? C : nullptr, D,
                          p.steps.uses_bias() ? op->bias : nullptr,
                          p.steps.uses_aux() ? op->aux : nullptr,
                          device_scalars ? alpha : nullptr, device_scalars ? beta : nullptr},
                         work);
}

}  // extern "C"
#pragma GCC visibility pop
