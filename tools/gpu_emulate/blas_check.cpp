// blas_check.cpp: checks the CPU stand-ins for cuBLASLt and cuBLAS (cublaslt.cpp, cublas.cpp)
// against a double-precision reference: every epilogue, transposes, fp32 and bf16 inputs and
// outputs, leading dimensions larger than the rows, C == D in place, beta 0 with a NaN C,
// bias and aux types, bf16 rounding ties, padding that must stay untouched, the engine's own
// row-major-to-column-major mapping, and the status codes of wrong arguments.
//
// Usage: blas_check DIR (the directory build.sh wrote). Prints the number of checks and
// failures; exits non-zero on any failure.
#include <dlfcn.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

typedef int st;
struct Algo { uint64_t data[8]; };
struct HR { Algo algo; size_t ws; int state; float waves; int reserved[4]; };
static_assert(sizeof(HR) == 96, "");
static_assert(offsetof(HR, ws) == 64 && offsetof(HR, state) == 72 && offsetof(HR, waves) == 76, "");

#define LOAD(lib, name) auto name = (decltype(&name##_t))dlsym(lib, #name); if (!name) { printf("missing %s\n", #name); exit(1); }
size_t cublasLtGetVersion_t();
const char* cublasLtGetStatusName_t(st);
st cublasLtCreate_t(void**);
st cublasLtDestroy_t(void*);
st cublasLtMatmulDescCreate_t(void**, int, int);
st cublasLtMatmulDescDestroy_t(void*);
st cublasLtMatmulDescSetAttribute_t(void*, int, const void*, size_t);
st cublasLtMatrixLayoutCreate_t(void**, int, uint64_t, uint64_t, int64_t);
st cublasLtMatrixLayoutDestroy_t(void*);
st cublasLtMatmulPreferenceCreate_t(void**);
st cublasLtMatmulPreferenceDestroy_t(void*);
st cublasLtMatmulPreferenceSetAttribute_t(void*, int, const void*, size_t);
st cublasLtMatmulAlgoGetHeuristic_t(void*, void*, void*, void*, void*, void*, void*, int, HR*, int*);
st cublasLtMatmul_t(void*, void*, const void*, const void*, void*, const void*, void*, const void*, const void*, void*, void*, void*, const void*, void*, size_t, void*);
st cublasGetProperty_t(int, int*);
const char* cublasGetStatusName_t(st);
st cublasCreate_v2_t(void**);
st cublasDestroy_v2_t(void*);
st cublasSetStream_v2_t(void*, void*);
st cublasSetMathMode_t(void*, int);
st cublasSgemm_v2_t(void*, int, int, int, int, int, const float*, const float*, int, const float*, int, const float*, float*, int);
st cublasSgemmStridedBatched_t(void*, int, int, int, int, int, const float*, const float*, int, long long, const float*, int, long long, const float*, float*, int, long long, int);

static int failures = 0, checks = 0;
#define CHECK(cond, ...) do { checks++; if (!(cond)) { failures++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static float bf2f(uint16_t h) { uint32_t b = uint32_t(h) << 16; float f; memcpy(&f, &b, 4); return f; }
static uint16_t f2bf(float f) {  // independent RNE via double arithmetic
    if (std::isnan(f)) return 0x7fc0;
    uint32_t b; memcpy(&b, &f, 4);
    uint32_t lo = b & 0xffff, hi = b >> 16;
    if (lo > 0x8000 || (lo == 0x8000 && (hi & 1))) hi++;
    return uint16_t(hi);
}

const int F32 = 0, BF16 = 14;
// Typed buffer.
struct Buf {
    int type; std::vector<uint8_t> bytes;
    Buf(int t, size_t n) : type(t), bytes(n * (t == BF16 ? 2 : 4) + 64) {}
    void* p() { return bytes.data(); }
    float get(size_t i) const { if (type == BF16) { uint16_t h; memcpy(&h, &bytes[2 * i], 2); return bf2f(h); } float f; memcpy(&f, &bytes[4 * i], 4); return f; }
    void set(size_t i, float v) { if (type == BF16) { uint16_t h = f2bf(v); memcpy(&bytes[2 * i], &h, 2); } else memcpy(&bytes[4 * i], &v, 4); }
    uint16_t bits16(size_t i) const { uint16_t h; memcpy(&h, &bytes[2 * i], 2); return h; }
};

static double gelu(double x) { return 0.5 * x * (1 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
static double gelu_grad(double x) { double k = 0.7978845608028654, t = std::tanh(k * (x + 0.044715 * x * x * x)); return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x); }

std::mt19937 rng(7);
static float rnd() { return std::uniform_real_distribution<float>(-1, 1)(rng); }

int main(int argc, char** argv) {
    if (argc != 2) { printf("usage: blas_check DIR\n"); return 2; }
    std::string dir = argv[1];
    void* lt = dlopen((dir + "/libcublasLt.so.13").c_str(), RTLD_NOW);
    void* cb = dlopen((dir + "/libcublas.so.13").c_str(), RTLD_NOW);
    if (!lt || !cb) { printf("dlopen: %s\n", dlerror()); return 1; }
    LOAD(lt, cublasLtGetVersion) LOAD(lt, cublasLtGetStatusName) LOAD(lt, cublasLtCreate) LOAD(lt, cublasLtDestroy)
    LOAD(lt, cublasLtMatmulDescCreate) LOAD(lt, cublasLtMatmulDescDestroy) LOAD(lt, cublasLtMatmulDescSetAttribute)
    LOAD(lt, cublasLtMatrixLayoutCreate) LOAD(lt, cublasLtMatrixLayoutDestroy) LOAD(lt, cublasLtMatmulPreferenceCreate)
    LOAD(lt, cublasLtMatmulPreferenceDestroy) LOAD(lt, cublasLtMatmulPreferenceSetAttribute) LOAD(lt, cublasLtMatmulAlgoGetHeuristic)
    LOAD(lt, cublasLtMatmul)
    LOAD(cb, cublasGetProperty) LOAD(cb, cublasGetStatusName) LOAD(cb, cublasCreate_v2) LOAD(cb, cublasDestroy_v2)
    LOAD(cb, cublasSetStream_v2) LOAD(cb, cublasSetMathMode) LOAD(cb, cublasSgemm_v2) LOAD(cb, cublasSgemmStridedBatched)

    CHECK(cublasLtGetVersion() == 130100, "version");
    CHECK(!strcmp(cublasLtGetStatusName(7), "CUBLAS_STATUS_INVALID_VALUE"), "name");
    CHECK(!strcmp(cublasLtGetStatusName(15), "CUBLAS_STATUS_NOT_SUPPORTED"), "name");
    CHECK(!strcmp(cublasLtGetStatusName(0), "CUBLAS_STATUS_SUCCESS"), "name");

    void* h = nullptr;
    CHECK(cublasLtCreate(&h) == 0 && h, "create");
    CHECK(cublasLtCreate(nullptr) == 7, "create null");

    // ---------------------------------------------------------------- general products
    // One product: all parameters, returns status, checks against double reference.
    struct Case { int ab, dt; bool ta, tb; int pad; float alpha, beta; bool inplace; uint32_t ep; int bias_type, aux_type; int aux_pad; int m, n, k; };
    auto run_case = [&](const Case& cs, const char* label) {
        int m = cs.m, n = cs.n, k = cs.k;
        uint64_t ar = cs.ta ? k : m, ac = cs.ta ? m : k, br = cs.tb ? n : k, bc = cs.tb ? k : n;
        int64_t lda = ar + cs.pad, ldb = br + cs.pad + 1, ldd = m + cs.pad, ldc = cs.inplace ? ldd : m + 2 * cs.pad + 3;
        Buf A(cs.ab, lda * ac), B(cs.ab, ldb * bc), C(cs.dt, ldc * n), D(cs.dt, ldd * n);
        for (size_t i = 0; i < lda * ac; i++) A.set(i, rnd());
        for (size_t i = 0; i < ldb * bc; i++) B.set(i, rnd());
        for (size_t i = 0; i < size_t(ldc) * n; i++) C.set(i, cs.beta == 0 ? NAN : rnd());  // beta 0: C must not be read
        for (size_t i = 0; i < size_t(ldd) * n; i++) D.set(i, NAN);
        if (cs.inplace) D = C;
        bool uses_bias = cs.ep == 4 || cs.ep == 164 || cs.ep == 256 || cs.ep == 512 || cs.ep == 6 || cs.ep == 36;
        bool uses_aux = cs.ep == 160 || cs.ep == 164 || cs.ep == 192;
        int bt = cs.bias_type < 0 ? cs.dt : cs.bias_type, xt = cs.aux_type < 0 ? cs.dt : cs.aux_type;
        int64_t aux_ld = ((m + cs.aux_pad + 7) / 8) * 8;
        size_t blen = cs.ep == 512 ? n : m;
        Buf bias(bt, blen), aux(xt, aux_ld * n);
        for (size_t i = 0; i < blen; i++) bias.set(i, cs.ep == 256 || cs.ep == 512 ? 1000.f : rnd() * 2);
        for (size_t i = 0; i < size_t(aux_ld) * n; i++) aux.set(i, cs.ep == 192 ? rnd() * 4 : -7.0f);
        Buf aux0 = aux;

        void *op, *la, *lb, *lc, *ld, *pref;
        cublasLtMatmulDescCreate(&op, 68, 0);
        int32_t ta = cs.ta, tb = cs.tb;
        CHECK(cublasLtMatmulDescSetAttribute(op, 3, &ta, 4) == 0, "transa");
        CHECK(cublasLtMatmulDescSetAttribute(op, 4, &tb, 4) == 0, "transb");
        if (cs.ep != 1) { uint32_t e = cs.ep; CHECK(cublasLtMatmulDescSetAttribute(op, 7, &e, 4) == 0, "ep"); }
        if (uses_bias) { void* bp = bias.p(); CHECK(cublasLtMatmulDescSetAttribute(op, 8, &bp, 8) == 0, "bias"); }
        if (uses_aux) { void* xp = aux.p(); CHECK(cublasLtMatmulDescSetAttribute(op, 11, &xp, 8) == 0, "aux"); CHECK(cublasLtMatmulDescSetAttribute(op, 12, &aux_ld, 8) == 0, "auxld"); }
        if (cs.bias_type >= 0) { int32_t t = cs.bias_type; CHECK(cublasLtMatmulDescSetAttribute(op, 26, &t, 4) == 0, "bt"); }
        if (cs.aux_type >= 0) { int32_t t = cs.aux_type; CHECK(cublasLtMatmulDescSetAttribute(op, 22, &t, 4) == 0, "xt"); }
        cublasLtMatrixLayoutCreate(&la, cs.ab, ar, ac, lda);
        cublasLtMatrixLayoutCreate(&lb, cs.ab, br, bc, ldb);
        cublasLtMatrixLayoutCreate(&ld, cs.dt, m, n, ldd);
        if (cs.inplace) lc = ld; else cublasLtMatrixLayoutCreate(&lc, cs.dt, m, n, ldc);
        cublasLtMatmulPreferenceCreate(&pref);
        uint64_t ws = 1 << 20; CHECK(cublasLtMatmulPreferenceSetAttribute(pref, 1, &ws, 8) == 0, "ws");
        uint32_t al = 16; for (int a = 5; a <= 8; a++) CHECK(cublasLtMatmulPreferenceSetAttribute(pref, a, &al, 4) == 0, "align");
        HR r[2]; memset(r, 0x5a, sizeof r); int ret = -1;
        st s = cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, ld, pref, 2, r, &ret);
        CHECK(s == 0 && ret == 1 && r[0].state == 0 && r[0].ws == 0, "%s heuristic %d %d", label, s, ret);
        void* Cp = cs.inplace ? D.p() : C.p();
        s = cublasLtMatmul(h, op, &cs.alpha, A.p(), la, B.p(), lb, &cs.beta, Cp, lc, D.p(), ld, &r[0].algo, nullptr, 0, nullptr);
        CHECK(s == 0, "%s matmul status %d", label, s);

        // reference
        auto opA = [&](int i, int p) { return double(cs.ta ? A.get(p + i * lda) : A.get(i + p * lda)); };
        auto opB = [&](int p, int j) { return double(cs.tb ? B.get(j + p * ldb) : B.get(p + j * ldb)); };
        const Buf& Csrc = cs.inplace ? C : C;  // C holds original values in both cases
        double maxerr = 0; bool ok = true; int bad_i = -1, bad_j = -1; double bad_w = 0, bad_g = 0;
        auto cmp = [&](double got, double want, double scale, int out_type, int i, int j) {
            double tol = (out_type == BF16 ? 1.0 / 128 : 2e-6) * (scale + 1e-3) + 1e-6;
            double e = std::fabs(got - want);
            if (!(e <= tol)) { if (ok) { bad_i = i; bad_j = j; bad_w = want; bad_g = got; } ok = false; }
            if (e / (scale + 1e-3) > maxerr) maxerr = e / (scale + 1e-3);
        };
        for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
            double acc = 0, mag = 0;
            for (int p = 0; p < k; p++) { acc += opA(i, p) * opB(p, j); mag += std::fabs(opA(i, p) * opB(p, j)); }
            double x = cs.alpha * acc; mag = std::fabs(cs.alpha) * mag;
            if (cs.beta != 0) { x += cs.beta * Csrc.get(i + j * ldc); mag += std::fabs(cs.beta * Csrc.get(i + j * ldc)); }
            double bv = 0;
            if (cs.ep == 4 || cs.ep == 164 || cs.ep == 6 || cs.ep == 36) { bv = bias.get(i); x += bv; mag += std::fabs(bv); }
            double out = x, omag = mag;
            if (cs.ep == 160 || cs.ep == 164) {
                cmp(aux.get(i + j * aux_ld), x, mag, xt, i, j);
                out = gelu(x); omag = mag * 1.2 + 1e-3;
            }
            if (cs.ep == 32 || cs.ep == 36) { out = gelu(x); omag = mag * 1.2; }
            if (cs.ep == 2 || cs.ep == 6) out = x > 0 ? x : 0;
            if (cs.ep == 192) { double g = gelu_grad(aux0.get(i + j * aux_ld)); out = x * g; omag = mag * (std::fabs(g) + 1.0); }
            cmp(D.get(i + j * ldd), out, omag, cs.dt, i, j);
        }
        // padding of D untouched (still NaN for out-of-place / original C for in-place)
        for (int j = 0; j < n; j++) for (int i = m; i < ldd; i++) {
            float g = D.get(i + j * ldd);
            if (cs.inplace) CHECK(g == C.get(i + j * ldc) || (std::isnan(g) && std::isnan(C.get(i + j * ldc))), "%s pad changed", label);
            else CHECK(std::isnan(g), "%s pad written", label);
        }
        if (uses_aux && cs.ep != 192) for (int j = 0; j < n; j++) for (int i = m; i < aux_ld; i++) CHECK(aux.get(i + j * aux_ld) == -7.0f, "%s aux pad written", label);
        if (cs.ep == 192) CHECK(aux.bytes == aux0.bytes, "%s DGELU modified aux", label);
        if (cs.ep == 256) for (int i = 0; i < m; i++) {
            double s2 = 0, mag = 0; for (int p = 0; p < k; p++) { s2 += opA(i, p); mag += std::fabs(opA(i, p)); }
            cmp(bias.get(i), s2, mag, bt, i, -1);
        }
        if (cs.ep == 512) for (int j = 0; j < n; j++) {
            double s2 = 0, mag = 0; for (int p = 0; p < k; p++) { s2 += opB(p, j); mag += std::fabs(opB(p, j)); }
            cmp(bias.get(j), s2, mag, bt, -1, j);
        }
        CHECK(ok, "%s: mismatch at (%d,%d) got %g want %g (max rel err %.3g)", label, bad_i, bad_j, bad_g, bad_w, maxerr);
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(ld);
        if (!cs.inplace) cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(op);
        return maxerr;
    };

    int ncases = 0;
    uint32_t eps[] = {1, 4, 160, 164, 192, 256, 512, 2, 6, 32, 36};
    for (int ab : {F32, BF16}) for (int dt : {F32, BF16}) {
        if (ab == F32 && dt == BF16) continue;
        for (int t = 0; t < 4; t++) for (int pad : {0, 3}) for (bool inplace : {false, true}) for (float beta : {0.f, 0.5f}) for (uint32_t ep : eps) {
            for (int typeset = 0; typeset < 2; typeset++) {
                int bias_type = -1, aux_type = -1;
                if (typeset == 1) { bias_type = dt == F32 ? BF16 : F32; aux_type = dt == F32 ? BF16 : F32; }
                Case cs{ab, dt, bool(t & 1), bool(t & 2), pad, 1.25f, beta, inplace, ep, bias_type, aux_type, pad ? 9 : 0, 13, 11, 7 + pad};
                char label[200];
                snprintf(label, sizeof label, "ab=%d d=%d ta=%d tb=%d pad=%d inplace=%d beta=%g ep=%u bt=%d xt=%d", ab, dt, t & 1, t >> 1, pad, inplace, beta, ep, bias_type, aux_type);
                run_case(cs, label);
                ncases++;
            }
        }
    }
    printf("general cases: %d\n", ncases);
    // some bigger shapes
    run_case(Case{BF16, F32, true, false, 5, 1.0f, 1.0f, true, 256, -1, -1, 0, 64, 48, 200}, "bigger bgrada");
    run_case(Case{BF16, BF16, false, true, 0, 1.0f, 0.f, false, 164, -1, -1, 8, 40, 33, 300}, "bigger gelu bf16");

    // ---------------------------------------------------------------- exactness
    {
        // bf16 rounding exactly RNE and bf16 widening exact: A = [x], B = [1], D bf16.
        std::vector<float> xs = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, 1.0f + 1.0f / 512, 1.0f + 3.0f / 512, -2.0f - 3.0f / 256, 3.1415926f, 1e-40f, 65504.5f, 3.4e38f, -0.0f};
        for (float x : xs) {
            Buf A(F32, 1), B(F32, 1), D(BF16, 1);
            A.set(0, x); B.set(0, 1.0f);
            // F32 x F32 -> BF16 D is not supported: use BF16 A with exact value x1 * x2 where both bf16
        }
        // bf16 inputs: choose a = 1 + 2^-7 (bf16 exact), b = 1 + 2^-7: product 1 + 2^-6 + 2^-14 -> RNE bf16 = 1 + 2^-6
        struct T { float a, b; } ts[] = {{1.0078125f, 1.0078125f}, {1.0078125f, 1.0f}, {3.0f, 1.0078125f}, {1.0078125f, -1.0078125f}, {-1.5f, 1.0234375f}};
        for (auto t : ts) {
            Buf A(BF16, 1), B(BF16, 1), D(BF16, 1), Df(F32, 1);
            A.set(0, t.a); B.set(0, t.b);
            void *op, *la, *lb, *ld, *lf;
            cublasLtMatmulDescCreate(&op, 68, 0);
            cublasLtMatrixLayoutCreate(&la, BF16, 1, 1, 1); cublasLtMatrixLayoutCreate(&lb, BF16, 1, 1, 1);
            cublasLtMatrixLayoutCreate(&ld, BF16, 1, 1, 1); cublasLtMatrixLayoutCreate(&lf, F32, 1, 1, 1);
            float one = 1, zero = 0;
            CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, nullptr, ld, D.p(), ld, nullptr, nullptr, 0, nullptr) == 0, "exact");
            CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, nullptr, lf, Df.p(), lf, nullptr, nullptr, 0, nullptr) == 0, "exact f");
            float prod = A.get(0) * B.get(0);  // exact in float (8-bit mantissas)
            CHECK(Df.get(0) == prod, "fp32 out exact %g vs %g", Df.get(0), prod);
            CHECK(D.bits16(0) == f2bf(prod), "bf16 RNE of %.10g: got %04x want %04x", prod, D.bits16(0), f2bf(prod));
            cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(ld); cublasLtMatrixLayoutDestroy(lf);
            cublasLtMatmulDescDestroy(op);
        }
        // Ties: 1 + 2^-8 exactly (tie between 1 and 1+2^-7 -> even = 1), 1 + 3*2^-8 (tie -> 1+2^-6 even)
        for (auto pr : std::vector<std::pair<float, uint16_t>>{{1.00390625f, 0x3f80}, {1.01171875f, 0x3f82}, {-1.00390625f, 0xbf80}}) {
            // a (bf16) = pr.first is not bf16-exact; use fp32 C with beta=1 and bf16 D: D = 0*... + C
            Buf A(BF16, 1), B(BF16, 1), C(BF16, 1), D(BF16, 1);
            A.set(0, 0); B.set(0, 0);
            // C must be bf16 typed (same as D). Build via alpha: a = 1, b = 1, alpha = pr.first
            A.set(0, 1.0f); B.set(0, 1.0f);
            void *op, *l;
            cublasLtMatmulDescCreate(&op, 68, 0); cublasLtMatrixLayoutCreate(&l, BF16, 1, 1, 1);
            float alpha = pr.first, zero = 0;
            CHECK(cublasLtMatmul(h, op, &alpha, A.p(), l, B.p(), l, &zero, nullptr, l, D.p(), l, nullptr, nullptr, 0, nullptr) == 0, "tie");
            CHECK(D.bits16(0) == pr.second, "tie %.10g -> %04x want %04x", pr.first, D.bits16(0), pr.second);
            cublasLtMatrixLayoutDestroy(l); cublasLtMatmulDescDestroy(op);
        }
    }

    // ---------------------------------------------------------------- engine conventions (row-major view)
    {
        // Mimic MatmulShape -> col_major: row-major C (m x n) = op(A) op(B); lt A = row-major B, lt B = row-major A.
        int m = 6, n = 8, k = 5;  // row-major
        // dW = X^T dY: X rows x ic stored (k x m) trans_a, dY k x n not transposed
        std::vector<float> X(k * m), dY(k * n), W(m * n);
        Buf Xb(BF16, k * m), dYb(BF16, k * n);
        for (int i = 0; i < k * m; i++) Xb.set(i, rnd());
        for (int i = 0; i < k * n; i++) dYb.set(i, rnd());
        std::vector<float> C0(m * n); for (auto& c : C0) c = rnd();
        Buf Cb(F32, m * n); for (int i = 0; i < m * n; i++) Cb.set(i, C0[i]);
        Buf vec(F32, 16); for (int i = 0; i < 16; i++) vec.set(i, 100);
        void *op, *la, *lb, *lc;
        cublasLtMatmulDescCreate(&op, 68, 0);
        int32_t ta_lt = 0 /* trans_b row */, tb_lt = 1 /* trans_a row */;
        cublasLtMatmulDescSetAttribute(op, 3, &ta_lt, 4); cublasLtMatmulDescSetAttribute(op, 4, &tb_lt, 4);
        uint32_t e = 256; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        void* vp = vec.p(); cublasLtMatmulDescSetAttribute(op, 8, &vp, 8);
        // view(stored (rows, cols), ld) = (cols, rows, ld)
        cublasLtMatrixLayoutCreate(&la, BF16, n, k, n);   // row-major dY (k x n, ld n)
        cublasLtMatrixLayoutCreate(&lb, BF16, m, k, m);   // row-major X stored (k x m, ld m)
        cublasLtMatrixLayoutCreate(&lc, F32, n, m, n);    // row-major C (m x n, ld n)
        float one = 1;
        CHECK(cublasLtMatmul(h, op, &one, dYb.p(), la, Xb.p(), lb, &one, Cb.p(), lc, Cb.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "engine bgrad");
        for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
            double want = C0[i * n + j]; for (int p = 0; p < k; p++) want += double(Xb.get(p * m + i)) * dYb.get(p * n + j);
            CHECK(std::fabs(Cb.get(i * n + j) - want) < 1e-5, "engine dW");
        }
        for (int j = 0; j < n; j++) { double s = 0; for (int p = 0; p < k; p++) s += dYb.get(p * n + j); CHECK(std::fabs(vec.get(j) - s) < 1e-5, "engine BiasGradB = column sums of row-major B (%d: %g vs %g)", j, vec.get(j), s); }
        CHECK(vec.get(n) == 100, "bias gradient wrote past n");
        // BGRADB on the same: row sums of op(A) row-major = sums over k of X[:, i]
        e = 512; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        for (int i = 0; i < 16; i++) vec.set(i, 100);
        float zero = 0;
        CHECK(cublasLtMatmul(h, op, &one, dYb.p(), la, Xb.p(), lb, &zero, Cb.p(), lc, Cb.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "engine bgradb");
        for (int i = 0; i < m; i++) { double s = 0; for (int p = 0; p < k; p++) s += Xb.get(p * m + i); CHECK(std::fabs(vec.get(i) - s) < 1e-5, "engine BiasGradA = row sums of op(A)"); }
        CHECK(vec.get(m) == 100, "bgradb wrote past m");
        // Bias epilogue: row-major bias[j] over columns
        e = 4; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        for (int j = 0; j < 16; j++) vec.set(j, j * 0.5f);
        CHECK(cublasLtMatmul(h, op, &one, dYb.p(), la, Xb.p(), lb, &zero, Cb.p(), lc, Cb.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "engine bias");
        for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
            double want = j * 0.5; for (int p = 0; p < k; p++) want += double(Xb.get(p * m + i)) * dYb.get(p * n + j);
            CHECK(std::fabs(Cb.get(i * n + j) - want) < 1e-5, "engine bias over columns");
        }
        // GELU_AUX with row-major aux stride 16 (>= n = 8, multiple of 8)
        e = 160; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        Buf aux(F32, m * 16); for (int i = 0; i < m * 16; i++) aux.set(i, -7);
        void* xp = aux.p(); int64_t xld = 16; cublasLtMatmulDescSetAttribute(op, 11, &xp, 8); cublasLtMatmulDescSetAttribute(op, 12, &xld, 8);
        CHECK(cublasLtMatmul(h, op, &one, dYb.p(), la, Xb.p(), lb, &zero, Cb.p(), lc, Cb.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "engine gelu");
        for (int i = 0; i < m; i++) for (int j = 0; j < 16; j++) {
            if (j >= n) { CHECK(aux.get(i * 16 + j) == -7, "aux pad"); continue; }
            double pre = 0; for (int p = 0; p < k; p++) pre += double(Xb.get(p * m + i)) * dYb.get(p * n + j);
            CHECK(std::fabs(aux.get(i * 16 + j) - pre) < 1e-5, "engine aux row-major");
            CHECK(std::fabs(Cb.get(i * n + j) - gelu(pre)) < 1e-5, "engine gelu out");
        }
        cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
    }

    // ---------------------------------------------------------------- errors
    {
        void *op, *la, *lb, *lc, *pref, *lbad, *lshort, *l16f;
        cublasLtMatmulDescCreate(&op, 68, 0);
        cublasLtMatrixLayoutCreate(&la, BF16, 4, 4, 4); cublasLtMatrixLayoutCreate(&lb, BF16, 4, 4, 4); cublasLtMatrixLayoutCreate(&lc, F32, 4, 4, 4);
        cublasLtMatrixLayoutCreate(&lbad, BF16, 4, 5, 4);     // k mismatch for B
        cublasLtMatrixLayoutCreate(&lshort, BF16, 4, 4, 3);   // ld < rows
        cublasLtMatrixLayoutCreate(&l16f, 2, 4, 4, 4);        // CUDA_R_16F
        cublasLtMatmulPreferenceCreate(&pref);
        HR r; int ret = 7;
        Buf A(BF16, 16), B(BF16, 16), C(F32, 16); float one = 1, zero = 0;
        for (int i = 0; i < 16; i++) { A.set(i, 1); B.set(i, 1); }
        CHECK(cublasLtMatmulAlgoGetHeuristic(nullptr, op, la, lb, lc, lc, pref, 1, &r, &ret) == 1, "null handle heuristic");
        CHECK(cublasLtMatmul(nullptr, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 1, "null handle matmul");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 0, &r, &ret) == 7, "requested 0");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, nullptr, la, lb, lc, lc, pref, 1, &r, &ret) == 7, "null desc");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lbad, lc, lc, pref, 1, &r, &ret) == 7, "dim mismatch");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, lshort, lb, lc, lc, pref, 1, &r, &ret) == 7, "ld < rows");
        CHECK(cublasLtMatmul(h, op, &one, A.p(), lshort, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "ld < rows matmul");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, l16f, l16f, lc, lc, pref, 1, &r, &ret) == 15 && ret == 0, "16F not supported");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &r, &ret) == 0 && ret == 1, "ok heuristic");
        // F32 A with bf16 D unsupported
        void *lfa, *lbd; cublasLtMatrixLayoutCreate(&lfa, F32, 4, 4, 4); cublasLtMatrixLayoutCreate(&lbd, BF16, 4, 4, 4);
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, lfa, lfa, lbd, lbd, pref, 1, &r, &ret) == 15, "f32 in bf16 out");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lbd, lc, pref, 1, &r, &ret) == 7, "C type != D type");
        // compute type / scale type
        void* op2; cublasLtMatmulDescCreate(&op2, 77, 0);
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op2, la, lb, lc, lc, pref, 1, &r, &ret) == 15, "compute type");
        cublasLtMatmulDescDestroy(op2);
        // attributes
        int32_t v32 = 1; int64_t v64 = 8;
        CHECK(cublasLtMatmulDescSetAttribute(op, 3, &v64, 8) == 7, "size mismatch");
        CHECK(cublasLtMatmulDescSetAttribute(op, 3, nullptr, 4) == 7, "null buf");
        v32 = 9; CHECK(cublasLtMatmulDescSetAttribute(op, 3, &v32, 4) == 7, "bad op value");
        CHECK(cublasLtMatmulDescSetAttribute(op, 17, &v64, 8) == 15, "A_SCALE_POINTER not supported");
        CHECK(cublasLtMatmulDescSetAttribute(op, 999, &v32, 4) == 15, "unknown attr");
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, 999, &v32, 4) == 7, "unknown pref attr");
        CHECK(cublasLtMatmulPreferenceSetAttribute(pref, 1, &v32, 4) == 7, "pref size mismatch");
        // epilogue problems
        uint32_t e = 208; CHECK(cublasLtMatmulDescSetAttribute(op, 7, &e, 4) == 0, "set DGELU_BGRAD");
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &r, &ret) == 15, "DGELU_BGRAD not supported");
        e = 160; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &r, &ret) == 7, "aux ld unset");
        v64 = 12; cublasLtMatmulDescSetAttribute(op, 12, &v64, 8);
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &r, &ret) == 7, "aux ld not multiple of 8");
        v64 = 8; cublasLtMatmulDescSetAttribute(op, 12, &v64, 8);
        CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 1, &r, &ret) == 0, "aux ld 8 ok");
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, &r.algo, nullptr, 0, nullptr) == 7, "null aux pointer");
        e = 4; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, &r.algo, nullptr, 0, nullptr) == 7, "null bias pointer");
        int32_t t14 = 2; cublasLtMatmulDescSetAttribute(op, 26, &t14, 4);
        void* bp = C.p(); cublasLtMatmulDescSetAttribute(op, 8, &bp, 8);
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, &r.algo, nullptr, 0, nullptr) == 15, "bias type 16F");
        e = 1; cublasLtMatmulDescSetAttribute(op, 7, &e, 4);
        Algo junk{}; CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, &junk, nullptr, 0, nullptr) == 7, "foreign algo");
        CHECK(cublasLtMatmul(h, op, nullptr, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "null alpha");
        CHECK(cublasLtMatmul(h, op, &one, nullptr, la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "null A");
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &one, nullptr, lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "null C with beta 1");
        CHECK(cublasLtMatmul(h, op, &one, (char*)A.p() + 1, la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "misaligned A");
        // in place with different layouts
        void* lc8; cublasLtMatrixLayoutCreate(&lc8, F32, 4, 4, 5);
        Buf big(F32, 40);
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &one, big.p(), lc8, big.p(), lc, nullptr, nullptr, 0, nullptr) == 7, "in place different layouts");
        // C broadcast with ld 0
        void* lc0; cublasLtMatrixLayoutCreate(&lc0, F32, 4, 4, 0);
        Buf col(F32, 4); for (int i = 0; i < 4; i++) col.set(i, i * 10);
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &one, col.p(), lc0, C.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "ld 0 C");
        for (int j = 0; j < 4; j++) for (int i = 0; i < 4; i++) CHECK(C.get(i + 4 * j) == 4 + i * 10, "broadcast C");
        // destroyed objects
        void* tmp; cublasLtMatrixLayoutCreate(&tmp, F32, 4, 4, 4); cublasLtMatrixLayoutDestroy(tmp);
        CHECK(cublasLtMatrixLayoutDestroy(tmp) == 7, "double destroy");
        CHECK(cublasLtMatmulDescDestroy(la) == 7, "wrong kind destroy");
        void* h2; cublasLtCreate(&h2); cublasLtDestroy(h2);
        CHECK(cublasLtMatmul(h2, op, &one, A.p(), la, B.p(), lb, &zero, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 1, "destroyed handle");
        CHECK(cublasLtDestroy(h2) == 1, "destroy twice");
        // empty problem: k = 0 -> D = beta C
        void *lk0a, *lk0b; cublasLtMatrixLayoutCreate(&lk0a, BF16, 4, 0, 4); cublasLtMatrixLayoutCreate(&lk0b, BF16, 0, 4, 0);
        for (int i = 0; i < 16; i++) C.set(i, 2);
        float half = 0.5f;
        CHECK(cublasLtMatmul(h, op, &one, nullptr, lk0a, nullptr, lk0b, &half, C.p(), lc, C.p(), lc, nullptr, nullptr, 0, nullptr) == 0, "k=0");
        CHECK(C.get(5) == 1, "k=0 result");
    }

    // ---------------------------------------------------------------- speed
    {
        int m = 512, n = 512, k = 2048;
        Buf A(BF16, (size_t)k * m), B(BF16, (size_t)k * n), D(F32, (size_t)m * n);
        for (size_t i = 0; i < (size_t)k * m; i++) A.set(i, rnd());
        for (size_t i = 0; i < (size_t)k * n; i++) B.set(i, rnd());
        void *op, *la, *lb, *ld;
        cublasLtMatmulDescCreate(&op, 68, 0);
        int32_t t = 1; cublasLtMatmulDescSetAttribute(op, 3, &t, 4);
        cublasLtMatrixLayoutCreate(&la, BF16, k, m, k); cublasLtMatrixLayoutCreate(&lb, BF16, k, n, k); cublasLtMatrixLayoutCreate(&ld, F32, m, n, m);
        float one = 1, zero = 0;
        auto t0 = std::chrono::steady_clock::now();
        CHECK(cublasLtMatmul(h, op, &one, A.p(), la, B.p(), lb, &zero, D.p(), ld, D.p(), ld, nullptr, nullptr, 0, nullptr) == 0, "speed");
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        printf("cuBLASLt 512x512x2048 TN bf16: %.3f s\n", secs);
        // spot check
        for (int s = 0; s < 20; s++) { int i = rng() % m, j = rng() % n; double w = 0; for (int p = 0; p < k; p++) w += double(A.get(p + i * k)) * B.get(p + j * k); CHECK(std::fabs(D.get(i + j * m) - w) < 1e-3, "big spot"); }
    }

    // ---------------------------------------------------------------- cuBLAS
    {
        int v[3];
        for (int i = 0; i < 3; i++) CHECK(cublasGetProperty(i, &v[i]) == 0, "prop");
        CHECK(v[0] == 13 && v[1] == 1 && v[2] == 0, "version %d.%d.%d", v[0], v[1], v[2]);
        CHECK(cublasGetProperty(3, &v[0]) == 7, "bad prop");
        CHECK(!strcmp(cublasGetStatusName(1), "CUBLAS_STATUS_NOT_INITIALIZED"), "name");
        void* g; CHECK(cublasCreate_v2(&g) == 0, "create");
        CHECK(cublasSetStream_v2(g, (void*)0x1234) == 0, "stream");
        CHECK(cublasSetMathMode(g, 0) == 0 && cublasSetMathMode(g, 16 | 2) == 0 && cublasSetMathMode(g, 5) == 7, "math mode");
        for (int tr = 0; tr < 6; tr++) for (int pad : {0, 2}) for (float beta : {0.f, 0.75f}) for (float alpha : {1.f, -0.5f, 0.f}) {
            int ta = tr % 3, tb = (tr / 3) ? 1 : 0;  // ta in {N,T,C}
            int m = 9, n = 7, k = 5, batch = 3;
            int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
            int lda = ar + pad, ldb = br + pad, ldc = m + pad;
            long long sa = (long long)lda * ac + 3, sb = (long long)ldb * bc + 1, sc = (long long)ldc * n + 2;
            std::vector<float> A(sa * batch), B(sb * batch), C(sc * batch), C0;
            for (auto& x : A) x = rnd();
            for (auto& x : B) x = rnd();
            for (auto& x : C) x = beta == 0 ? NAN : rnd();
            if (alpha == 0) A[0] = NAN;  // A not read when alpha == 0
            C0 = C;
            for (int bmode = 0; bmode < 2; bmode++) {
                C = C0;
                st s = bmode == 0 ? cublasSgemm_v2(g, ta, tb, m, n, k, &alpha, A.data(), lda, B.data(), ldb, &beta, C.data(), ldc)
                                  : cublasSgemmStridedBatched(g, ta, tb, m, n, k, &alpha, A.data(), lda, sa, B.data(), ldb, sb, &beta, C.data(), ldc, sc, batch);
                CHECK(s == 0, "sgemm status %d", s);
                int nb = bmode == 0 ? 1 : batch;
                for (int bb = 0; bb < nb; bb++) for (int j = 0; j < n; j++) for (int i = 0; i < ldc; i++) {
                    size_t ci = bb * sc + i + (size_t)j * ldc;
                    if (i >= m) { CHECK(std::isnan(C[ci]) == std::isnan(C0[ci]) && (std::isnan(C[ci]) || C[ci] == C0[ci]), "sgemm pad touched"); continue; }
                    double w = 0, mag = 0;
                    if (alpha != 0) for (int p = 0; p < k; p++) {
                        double a = ta ? A[bb * sa + p + (size_t)i * lda] : A[bb * sa + i + (size_t)p * lda];
                        double b = tb ? B[bb * sb + j + (size_t)p * ldb] : B[bb * sb + p + (size_t)j * ldb];
                        w += a * b; mag += std::fabs(a * b);
                    }
                    w *= alpha; mag *= std::fabs(alpha);
                    if (beta != 0) { w += beta * C0[ci]; mag += std::fabs(beta * C0[ci]); }
                    CHECK(std::fabs(C[ci] - w) <= 2e-6 * (mag + 1e-3), "sgemm ta=%d tb=%d pad=%d beta=%g alpha=%g batch %d (%d,%d): %g vs %g", ta, tb, pad, beta, alpha, bb, i, j, C[ci], w);
                }
                // untouched gaps between batches
                if (bmode == 1) for (int bb = 0; bb < batch; bb++) for (long long q = (long long)ldc * n; q < sc; q++) {
                    size_t ci = bb * sc + q; CHECK(std::isnan(C[ci]) == std::isnan(C0[ci]), "batch gap");
                }
            }
        }
        float one = 1, zero = 0; std::vector<float> A(100, 1), B(100, 1), C(100, 0);
        CHECK(cublasSgemm_v2(nullptr, 0, 0, 4, 4, 4, &one, A.data(), 4, B.data(), 4, &zero, C.data(), 4) == 1, "null handle");
        CHECK(cublasSgemm_v2(g, 0, 0, 4, 4, 4, &one, A.data(), 3, B.data(), 4, &zero, C.data(), 4) == 7, "lda short");
        CHECK(cublasSgemm_v2(g, 1, 0, 4, 4, 5, &one, A.data(), 4, B.data(), 5, &zero, C.data(), 4) == 7, "lda short T");
        CHECK(cublasSgemm_v2(g, 0, 1, 4, 4, 4, &one, A.data(), 4, B.data(), 3, &zero, C.data(), 4) == 7, "ldb short");
        CHECK(cublasSgemm_v2(g, 0, 0, 4, 4, 4, &one, A.data(), 4, B.data(), 4, &zero, C.data(), 3) == 7, "ldc short");
        CHECK(cublasSgemm_v2(g, 5, 0, 4, 4, 4, &one, A.data(), 4, B.data(), 4, &zero, C.data(), 4) == 7, "bad op");
        CHECK(cublasSgemm_v2(g, 0, 0, -1, 4, 4, &one, A.data(), 4, B.data(), 4, &zero, C.data(), 4) == 7, "negative m");
        CHECK(cublasSgemm_v2(g, 0, 0, 0, 4, 4, &one, A.data(), 1, B.data(), 4, &zero, C.data(), 1) == 0, "m = 0");
        CHECK(cublasSgemmStridedBatched(g, 0, 0, 4, 4, 4, &one, A.data(), 4, 0, B.data(), 4, 0, &zero, C.data(), 4, 16, -1) == 7, "neg batch");
        // k = 0: C = beta C
        for (auto& c : C) c = 3;
        float h2 = 0.5f;
        CHECK(cublasSgemm_v2(g, 0, 0, 4, 4, 0, &one, nullptr, 4, nullptr, 1, &h2, C.data(), 4) == 0 && C[5] == 1.5f, "k = 0");
        // speed
        int m = 512, n = 512, k = 2048; std::vector<float> X((size_t)m * k), Y((size_t)k * n), Z((size_t)m * n);
        for (auto& x : X) x = rnd();
        for (auto& y : Y) y = rnd();
        auto t0 = std::chrono::steady_clock::now();
        CHECK(cublasSgemm_v2(g, 0, 1, m, n, k, &one, X.data(), m, Y.data(), n, &zero, Z.data(), m) == 0, "speed");
        printf("cuBLAS sgemm 512x512x2048 NT: %.3f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        CHECK(cublasDestroy_v2(g) == 0 && cublasDestroy_v2(g) == 1, "destroy");
        CHECK(cublasSetStream_v2(g, nullptr) == 1, "destroyed handle");
    }

    CHECK(cublasLtDestroy(h) == 0, "destroy");
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
