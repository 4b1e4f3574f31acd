// main.cpp: checks the memory-bound kernels of kernels/*.cu on the CPU (see shim.h) against
// straightforward C++ references, in three situations per shape:
//   aligned  every pointer 16-byte aligned (vector path where the length allows);
//   shifted  every pointer one element past a 16-byte boundary (the kernels that work with
//            a shift still use vector accesses; the others fall back to scalar accesses);
//   mixed    the first pointer one element off, the others aligned (scalar accesses; the
//            bf16 GELU kernels put each of their pointers off in turn);
// with lengths that are multiples of 4, not multiples of 4, and tiny (1..7). Every buffer has
// NaN guard elements on both sides, which must come back untouched (no out-of-bounds write;
// an out-of-bounds read would put a NaN into the result). The shim counts the vector
// accesses and stops the run on a misaligned one; each case checks that the vector path was
// taken exactly when the kernel's contract says so.
//
// Elementwise, cast, copy, AdamW and the ordered column sums: bit for bit against the
// reference (the same expressions per element; built with -ffp-contract=off, as the
// reference; the fp32 GELU references are in turn checked against float64). LayerNorm and
// cross-entropy (reductions whose per-thread order the kernels document): against a float64
// reference within a tight tolerance, plus the bit-for-bit contracts between kernels
// (layernorm_recompute and residual_layernorm_forward against layernorm_forward, LayerNorm
// results independent of pointer alignment).
//
// Build and run: tools/kernel_emulate/run.sh. Prints one line per kernel, then PASS or FAIL,
// and exits non-zero on failure.
#include "shim.h"
#include "../../kernels/common.cuh"
namespace ew {
#include "../../kernels/elementwise.cu"
}
namespace cst {
#include "../../kernels/cast.cu"
}
namespace ln {
#include "../../kernels/layernorm.cu"
}
namespace xent {
#include "../../kernels/cross_entropy.cu"
}
namespace emb {
#include "../../kernels/embedding.cu"
}
namespace adam {
#include "../../kernels/adamw.cu"
}
namespace dec {
#include "../../kernels/decode.cu"
}
#include <algorithm>
#include <map>
#include <random>
#include <string>

// ------------------------------------------------------------------ launch geometry
// The host's launch helpers (src/engine/cuda/kernels.rs), block 256.
static const unsigned BLOCK = 256;
static unsigned blocks_for(long long threads) {
    return (unsigned)std::max<long long>(1, (threads + BLOCK - 1) / BLOCK);
}
static dim3 grid_vec(long long n) { return {blocks_for((n + 3 + 3) / 4), 1, 1}; }
static unsigned grid_cols4(long long cols) { return blocks_for((cols + 3) / 4); }
static dim3 grid_rows(long long rows) { return {(unsigned)std::max<long long>(1, (rows + 7) / 8), 1, 1}; }

// ------------------------------------------------------------------ buffers with guards
template <class T>
struct Buf {
    static constexpr size_t G = 16;  // guard elements on each side (a multiple of 16 bytes)
    T* base = nullptr;
    T* p = nullptr;
    size_t n = 0, off = 0;
    Buf(size_t n_, size_t off_) : n(n_), off(off_) {
        size_t bytes = ((n + off + 2 * G) * sizeof(T) + 63) / 64 * 64;
        base = (T*)std::aligned_alloc(64, bytes);
        std::memset(base, 0xff, bytes);  // NaN in every float type
        p = base + G + off;
    }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    ~Buf() { std::free(base); }
    void set(const std::vector<T>& v) { std::memcpy(p, v.data(), n * sizeof(T)); }
    std::vector<T> get() const { return std::vector<T>(p, p + n); }
    bool guards_intact() const {
        auto ff = [](const T* q, size_t k) {
            const unsigned char* b = (const unsigned char*)q;
            return std::all_of(b, b + k * sizeof(T), [](unsigned char c) { return c == 0xff; });
        };
        return ff(base, G + off) && ff(p + n, G);
    }
};

// ------------------------------------------------------------------ bookkeeping
enum Sit { ALIGNED, SHIFTED, MIXED };
static const char* sit_name[] = {"aligned", "shifted", "mixed"};
static size_t off_first(Sit s) { return s == ALIGNED ? 0 : 1; }
static size_t off_rest(Sit s) { return s == SHIFTED ? 1 : 0; }

struct Tally {
    int cases = 0, fails = 0;
    long long vec = 0;  // vector accesses in the aligned cases
    double worst = 0;   // worst error of the tolerance checks (-1: bit-exact kernel)
    bool exact = true;
};
static std::map<std::string, Tally> tallies;
static int failures = 0;

static void fail(const std::string& kernel, const std::string& what) {
    failures++;
    tallies[kernel].fails++;
    std::printf("FAIL %s: %s\n", kernel.c_str(), what.c_str());
}
static void check(bool ok, const std::string& kernel, const std::string& what) {
    if (!ok) fail(kernel, what);
}
// Starts a case: resets the vector-access counter.
static std::string begin(const std::string& kernel, const std::string& shape, Sit s) {
    tallies[kernel].cases++;
    vec_accesses = 0;
    emu_current = kernel + " " + shape + " " + sit_name[s];
    return shape + " " + sit_name[s];
}
// Ends a case: the vector path was taken iff `expect_vec`.
static void end(const std::string& kernel, const std::string& c, Sit s, bool expect_vec) {
    long long v = vec_accesses.load();
    if (s == ALIGNED) tallies[kernel].vec += v;
    if ((v > 0) != expect_vec)
        fail(kernel, c + ": " + std::to_string(v) + " vector accesses, expected " +
                         (expect_vec ? "some" : "none"));
}
template <class T>
static bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}
template <class T>
static void exact(const std::string& k, const std::string& c, const char* what,
                  const std::vector<T>& got, const std::vector<T>& want) {
    if (same_bits(got, want)) return;
    size_t i = 0;
    while (i < got.size() && std::memcmp(&got[i], &want[i], sizeof(T)) == 0) i++;
    fail(k, c + ": " + what + " differs from the reference at element " + std::to_string(i) +
                " of " + std::to_string(got.size()) + " (got " +
                std::to_string((double)got[i]) + ", want " + std::to_string((double)want[i]) +
                ")");
}
// max |got - want| / max(1, max |want|), over finite values (NaN anywhere fails).
static void within_tol(const std::string& k, const std::string& c, const char* what,
                  const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double num = 0, den = 1;
    bool finite = true;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) finite = false;
        num = std::max(num, std::fabs((double)got[i] - want[i]));
        den = std::max(den, std::fabs(want[i]));
    }
    double e = finite ? num / den : INFINITY;
    Tally& t = tallies[k];
    t.exact = false;
    t.worst = std::max(t.worst, e);
    if (!(e <= tol)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, ": %s error %.3e above %.0e", what, e, tol);
        fail(k, c + buf);
    }
}
template <class... B>
static void guards(const std::string& k, const std::string& c, const B&... bufs) {
    bool ok = (bufs.guards_intact() && ...);
    check(ok, k, c + ": a write outside the buffers (guard elements changed)");
}

static std::mt19937_64 rng(12345);
static std::vector<float> randn(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

// The row table embedding_backward_wte reads (kernels/embedding.cu): distinct tokens U,
// where each token's rows start (then N), the tokens, the rows grouped by token. The kernel
// takes the tokens in any order; this lists them in increasing order (the engine's host
// code, most rows first: a second valid order).
static std::vector<unsigned> token_rows(const std::vector<unsigned>& tok) {
    size_t n = tok.size();
    std::vector<unsigned> rows(n);
    for (size_t i = 0; i < n; i++) rows[i] = (unsigned)i;
    std::stable_sort(rows.begin(), rows.end(), [&](unsigned a, unsigned b) { return tok[a] < tok[b]; });
    std::vector<unsigned> t(3 * n + 2, 0);
    unsigned u = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || tok[rows[i]] != tok[rows[i - 1]]) {
            t[1 + u] = (unsigned)i;
            t[n + 2 + u] = tok[rows[i]];
            u++;
        }
        t[2 * n + 2 + i] = rows[i];
    }
    t[0] = u;
    t[1 + u] = (unsigned)n;
    return t;
}

// ------------------------------------------------------------------ references
static const float K_GELU = 0.7978846f;
static float ref_gelu(float v) {
    float t = tanhf(K_GELU * (v + 0.044715f * v * v * v));
    return 0.5f * v * (1.0f + t);
}
static float ref_gelu_grad(float v) {
    float t = tanhf(K_GELU * (v + 0.044715f * v * v * v));
    float sech2 = 1.0f - t * t;
    return 0.5f * (1.0f + t) + 0.5f * v * sech2 * K_GELU * (1.0f + 3.0f * 0.044715f * v * v);
}
// src/engine/dropout.rs's mask.
static bool ref_keep(uint64_t seed, uint64_t i, uint32_t threshold) {
    uint64_t z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (uint32_t)(z >> 32) >= threshold;
}
// fp32 -> bf16, round to nearest even, from the two neighbours (NaN: quiet, sign kept).
static unsigned short ref_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    uint32_t lo = u >> 16, rem = u & 0xffffu;
    if (rem > 0x8000u || (rem == 0x8000u && (lo & 1u))) lo += 1;  // carries into the exponent
    return (unsigned short)lo;
}
static float ref_widen(unsigned short b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static std::vector<float> widened(const std::vector<unsigned short>& h) {
    std::vector<float> v(h.size());
    for (size_t i = 0; i < h.size(); i++) v[i] = ref_widen(h[i]);
    return v;
}
// v with specials and bf16 ties among its values: NaN, infinities, overflow, exact ties.
static std::vector<float> with_specials(std::vector<float> v) {
    const uint32_t specials[] = {0x7fc00001u, 0xff800000u, 0x7f7fffffu, 0x3f808000u,
                                 0x3f818000u, 0x80000001u, 0x00000000u};
    long long n = (long long)v.size();
    for (long long i = 0; i < n && i < 7; i++) std::memcpy(&v[(i * 5) % n], &specials[i], 4);
    return v;
}

// ------------------------------------------------------------------ 1-D elementwise kernels
static const std::vector<long long> LENGTHS = {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 64, 255, 1000, 1027, 2053};

// Shift-based kernels vectorise whenever a whole aligned group exists: n >= 4 at shift 0,
// n >= 7 at shift 1 (the group [3, 7)).
static bool shift_vec(long long n, size_t shift) { return n >= 4 + (long long)((4 - shift) % 4); }

static void check_unary() {
    for (long long n : LENGTHS)
        for (Sit s : {ALIGNED, SHIFTED, MIXED}) {
            auto x = randn(n, 2.0f), d0 = randn(n);
            bool co = s != MIXED;
            {
                std::string k = "gelu_forward", c = begin(k, "n=" + std::to_string(n), s);
                Buf<float> out(n, off_first(s)), in(n, off_rest(s));
                in.set(x);
                emulate_serial(grid_vec(n), BLOCK, [&] { ew::gelu_forward(out.p, in.p, n); });
                end(k, c, s, co && shift_vec(n, off_first(s)));
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++) want[i] = ref_gelu(x[i]);
                exact(k, c, "out", out.get(), want);
                exact(k, c, "x", in.get(), x);
                guards(k, c, out, in);
            }
            {
                std::string k = "gelu_backward_inplace", c = begin(k, "n=" + std::to_string(n), s);
                Buf<float> d(n, off_first(s)), in(n, off_rest(s));
                d.set(d0);
                in.set(x);
                emulate_serial(grid_vec(n), BLOCK, [&] { ew::gelu_backward_inplace(d.p, in.p, n); });
                end(k, c, s, co && shift_vec(n, off_first(s)));
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++) want[i] = d0[i] * ref_gelu_grad(x[i]);
                exact(k, c, "d", d.get(), want);
                guards(k, c, d, in);
            }
            {
                std::string k = "add_inplace", c = begin(k, "n=" + std::to_string(n), s);
                Buf<float> dst(n, off_first(s)), src(n, off_rest(s));
                dst.set(d0);
                src.set(x);
                emulate_serial(grid_vec(n), BLOCK, [&] { ew::add_inplace(dst.p, src.p, n); });
                end(k, c, s, co && shift_vec(n, off_first(s)));
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++) want[i] = d0[i] + x[i];
                exact(k, c, "dst", dst.get(), want);
                guards(k, c, dst, src);
            }
            for (bool inplace : {false, true}) {
                if (inplace && s == MIXED) continue;  // one buffer: no mixed alignment
                std::string k = "dropout_apply";
                std::string c = begin(k, "n=" + std::to_string(n) + (inplace ? " in place" : ""), s);
                uint64_t seed = 0x1234567890abcdefull + n;
                // The seed at slot 2 of a table whose other slots would drop differently.
                const unsigned long long seeds[4] = {~seed, seed + 1, seed, seed ^ 0xff};
                uint32_t threshold = 0x40000000u;  // p = 0.25
                float scale = 1.0f / 0.75f;
                Buf<float> out(n, off_first(s)), in(n, off_rest(s));
                in.set(x);
                out.set(x);
                float* src = inplace ? out.p : in.p;
                emulate_serial(grid_vec(n), BLOCK, [&] {
                    ew::dropout_apply(out.p, src, n, seeds, 2, threshold, scale);
                });
                end(k, c, s, (co || inplace) && shift_vec(n, off_first(s)));
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++)
                    want[i] = ref_keep(seed, (uint64_t)i, threshold) ? x[i] * scale : 0.0f;
                exact(k, c, "out", out.get(), want);
                guards(k, c, out, in);
            }
            {
                std::string k = "cast_f32_to_bf16", c = begin(k, "n=" + std::to_string(n), s);
                std::vector<float> v = with_specials(x);
                Buf<unsigned short> out(n, off_first(s));
                Buf<float> in(n, off_rest(s));
                in.set(v);
                emulate_serial(grid_vec(n), BLOCK, [&] { cst::cast_f32_to_bf16(out.p, in.p, n); });
                end(k, c, s, co && shift_vec(n, off_first(s)));
                std::vector<unsigned short> want(n);
                for (long long i = 0; i < n; i++) want[i] = ref_bf16(v[i]);
                exact(k, c, "out", out.get(), want);
                guards(k, c, out, in);
            }
            {
                // Exact widening (the fallback of a bf16-only operand).
                std::string k = "cast_bf16_to_f32", c = begin(k, "n=" + std::to_string(n), s);
                std::vector<unsigned short> v(n);
                for (long long i = 0; i < n; i++) v[i] = ref_bf16(x[i]);
                if (n > 2) v[1] = 0x7fc1, v[2] = 0xff80;  // a NaN payload, -inf
                Buf<float> out(n, off_first(s));
                Buf<unsigned short> in(n, off_rest(s));
                in.set(v);
                emulate_serial(grid_vec(n), BLOCK, [&] { cst::cast_bf16_to_f32(out.p, in.p, n); });
                end(k, c, s, co && shift_vec(n, off_first(s)));
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++) want[i] = ref_widen(v[i]);
                exact(k, c, "out", out.get(), want);
                guards(k, c, out, in);
            }
        }
}

// ------------------------------------------------------------------ bf16 GELU
// Offset of buffer i of a case (buffer 0: the output): all aligned, all one element off,
// or (mixed) buffer `odd` one element off and the others aligned.
static size_t off_odd(Sit s, int i, int odd) { return s == MIXED ? i == odd : off_first(s); }

// gelu_forward_bf16 (fp32 input with and without pre_out, bf16 input) and
// gelu_backward_bf16: bit for bit the bf16 rounding of the fp32 references above, at the
// widened bf16 input where the input is bf16. Mixed cases put each pointer off in turn, so
// every pointer of the kernel's co-alignment test is exercised.
static void check_gelu_bf16() {
    for (long long n : LENGTHS)
        for (Sit s : {ALIGNED, SHIFTED, MIXED}) {
            auto x = with_specials(randn(n, 2.0f)), d0 = randn(n);
            std::vector<unsigned short> xb(n);
            for (long long i = 0; i < n; i++) xb[i] = ref_bf16(x[i]);
            bool vec = s != MIXED && shift_vec(n, off_first(s));
            // The case name: n, the mode, and in a mixed case the pointer that is off.
            auto shape = [&](const std::string& mode, const char* odd) {
                std::string name = "n=" + std::to_string(n) + mode;
                return s == MIXED ? name + "; " + odd + " off" : name;
            };
            const char* mode_name[] = {" fp32 x + pre_out", " fp32 x", " bf16 x"};
            const std::vector<const char*> bufs[] = {  // buffer 0 the output, the last the input
                {"out", "pre_out", "x"}, {"out", "x"}, {"out", "x_bf16"}};
            for (int mode : {0, 1, 2}) {
                int nb = (int)bufs[mode].size();
                for (int odd = 0; odd < (s == MIXED ? nb : 1); odd++) {
                    std::string k = "gelu_forward_bf16";
                    std::string c = begin(k, shape(mode_name[mode], bufs[mode][odd]), s);
                    size_t oi = off_odd(s, nb - 1, odd);  // x or x_bf16
                    Buf<unsigned short> out(n, off_odd(s, 0, odd)), pre(n, off_odd(s, 1, odd)), inb(n, oi);
                    Buf<float> in(n, oi);
                    in.set(x), inb.set(xb);
                    unsigned short* pp = mode == 0 ? pre.p : nullptr;
                    const float* xp = mode == 2 ? nullptr : in.p;
                    const unsigned short* xbp = mode == 2 ? inb.p : nullptr;
                    emulate_serial(grid_vec(n), BLOCK, [&] { ew::gelu_forward_bf16(out.p, pp, xp, xbp, n); });
                    end(k, c, s, vec);
                    std::vector<unsigned short> want(n);
                    for (long long i = 0; i < n; i++)
                        want[i] = ref_bf16(ref_gelu(mode == 2 ? ref_widen(xb[i]) : x[i]));
                    exact(k, c, "out", out.get(), want);
                    if (mode == 0) exact(k, c, "pre_out", pre.get(), xb);
                    exact(k, c, "x", in.get(), x);
                    exact(k, c, "x_bf16", inb.get(), xb);
                    guards(k, c, out, pre, in, inb);
                }
            }
            const char* names[] = {"out", "d", "x_bf16"};
            for (int odd = 0; odd < (s == MIXED ? 3 : 1); odd++) {
                std::string k = "gelu_backward_bf16", c = begin(k, shape("", names[odd]), s);
                Buf<unsigned short> out(n, off_odd(s, 0, odd)), inb(n, off_odd(s, 2, odd));
                Buf<float> d(n, off_odd(s, 1, odd));
                d.set(d0), inb.set(xb);
                emulate_serial(grid_vec(n), BLOCK, [&] { ew::gelu_backward_bf16(out.p, d.p, inb.p, n); });
                end(k, c, s, vec);
                std::vector<unsigned short> want(n);
                for (long long i = 0; i < n; i++) want[i] = ref_bf16(d0[i] * ref_gelu_grad(ref_widen(xb[i])));
                exact(k, c, "out", out.get(), want);
                exact(k, c, "d", d.get(), d0);
                exact(k, c, "x_bf16", inb.get(), xb);
                guards(k, c, out, d, inb);
            }
        }
}

// The fp32 GELU references (which mirror the kernels' expressions) against float64: GELU
// itself and its derivative by central differences of the float64 GELU, so a formula wrong
// in both the kernels and the references cannot pass the bit-exact checks.
static void check_gelu_reference() {
    std::string k = "gelu reference vs float64", c = begin(k, "v in [-10, 10]", ALIGNED);
    auto g64 = [](double v) {
        return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    };
    std::vector<float> g, dg;
    std::vector<double> wg, wdg;
    const double h = 1e-4;
    for (int i = -4000; i <= 4000; i++) {
        float v = i / 400.0f;
        g.push_back(ref_gelu(v)), wg.push_back(g64(v));
        dg.push_back(ref_gelu_grad(v)), wdg.push_back((g64(v + h) - g64(v - h)) / (2 * h));
    }
    within_tol(k, c, "gelu", g, wg, 1e-6);
    within_tol(k, c, "gelu'", dg, wdg, 1e-5);
}

// adamw_update over several weight-decay runs (boundaries at arbitrary offsets, inside
// groups of four too), with and without clipping, against the per-element reference of
// torch.optim.AdamW after clip_grad_norm_: the same fp32 operations in the same order.
static void check_adamw() {
    for (long long n : LENGTHS)
        for (Sit s : {ALIGNED, SHIFTED, MIXED})
            for (int variant = 0; variant < 8; variant++) {
                bool with_bf16 = variant & 1, clipping = variant & 2, store_g = variant & 4;
                std::string k = "adamw_update";
                std::string c = begin(k, "n=" + std::to_string(n) + (with_bf16 ? " bf16 copy" : "") +
                                             (clipping ? " clipped" : "") +
                                             (store_g ? " g stored" : ""), s);
                auto p0 = randn(n), g0 = randn(n, 0.1f), m0 = randn(n, 0.01f), v0 = randn(n, 1e-3f);
                for (auto& x : v0) x = x * x;
                // Runs: decayed from 0, then alternating at n/3 + 1 and 2n/3 + 2 (when inside).
                std::vector<long long> runs = {0, 1};
                for (long long start : {n / 3 + 1, 2 * n / 3 + 2})
                    if (start > runs[runs.size() - 2] && start < n)
                        runs.insert(runs.end(), {start, (long long)(runs.size() / 2 % 2 == 0)});
                int n_runs = (int)runs.size() / 2;
                auto decays = [&](long long i) {
                    bool d = false;
                    for (int r = 0; r < n_runs; r++)
                        if (runs[2 * r] <= i) d = runs[2 * r + 1] != 0;
                    return d;
                };
                Buf<float> p(n, off_first(s)), g(n, off_rest(s)), m(n, off_rest(s)), v(n, off_rest(s));
                Buf<unsigned short> pb(n, off_rest(s));
                Buf<long long> rb(runs.size(), 0);
                p.set(p0), g.set(g0), m.set(m0), v.set(v0), rb.set(runs);
                float decay = 1.0f - 6e-4f * 0.1f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
                float step_size = 6e-4f / (1.0f - 0.9f * 0.9f), bc2 = std::sqrt(1.0f - 0.95f * 0.95f);
                float clip = clipping ? 0.37f : 1.0f;
                unsigned short* pbp = with_bf16 ? pb.p : nullptr;
                emulate_serial(grid_vec(n), BLOCK, [&] {
                    adam::adamw_update(p.p, g.p, m.p, v.p, n, rb.p, n_runs, decay, clip, b1, b2,
                                       eps, step_size, bc2, pbp, store_g ? 1 : 0);
                });
                end(k, c, s, s != MIXED && shift_vec(n, off_first(s)));
                std::vector<float> wp(n), wm(n), wv(n), wg(g0);
                std::vector<unsigned short> wb(n);
                for (long long i = 0; i < n; i++) {
                    // clip_grad_norm_, in place when stored; the update uses it either way.
                    float gi = clipping ? g0[i] * clip : g0[i];
                    if (store_g) wg[i] = gi;
                    float pi = p0[i] * (decays(i) ? decay : 1.0f);
                    float mi = m0[i] + (gi - m0[i]) * (1.0f - b1);
                    float vi = v0[i] * b2 + (1.0f - b2) * gi * gi;
                    float denom = sqrtf(vi) / bc2 + eps;
                    wp[i] = pi - step_size * mi / denom;
                    wm[i] = mi;
                    wv[i] = vi;
                    wb[i] = ref_bf16(wp[i]);
                }
                exact(k, c, "p", p.get(), wp);
                exact(k, c, "g", g.get(), wg);
                exact(k, c, "m", m.get(), wm);
                exact(k, c, "v", v.get(), wv);
                if (with_bf16) exact(k, c, "p_bf16", pb.get(), wb);
                guards(k, c, p, g, m, v, pb, rb);
            }
}

static void check_sumsq() {
    const unsigned parts = 3;
    for (long long n : LENGTHS)
        for (Sit s : {ALIGNED, SHIFTED}) {
            std::string k = "sumsq_parts", c = begin(k, "n=" + std::to_string(n), s);
            auto x = randn(n);
            Buf<float> g(n, off_first(s));
            Buf<double> out(parts, 0);
            g.set(x);
            emulate({parts, 1, 1}, BLOCK, [&] { adam::sumsq_parts(out.p, g.p, n); });
            end(k, c, s, shift_vec(n, off_first(s)));
            double got = 0, want = 0;
            for (double v : out.get()) got += v;
            for (float v : x) want += (double)v * v;
            within_tol(k, c, "sum", {(float)(got / want)}, {1.0}, 1e-12);
            guards(k, c, g, out);
        }
}

// ------------------------------------------------------------------ column sums, bias
static const std::vector<std::pair<int, int>> MATS = {
    {1, 1}, {3, 2}, {5, 3}, {2, 4}, {7, 5}, {4, 7}, {9, 8}, {6, 33}, {5, 64}, {4, 130}, {3, 1028}};

static void check_columns() {
    for (auto [rows, cols] : MATS)
        for (Sit s : {ALIGNED, SHIFTED, MIXED}) {
            std::string shape = std::to_string(rows) + "x" + std::to_string(cols);
            bool vec = s == ALIGNED && cols % 4 == 0;
            long long n = (long long)rows * cols;
            auto mv = randn(n), bv = randn(cols);
            for (bool null_bias : {false, true}) {
                std::string k = "bias_broadcast";
                std::string c = begin(k, shape + (null_bias ? " no bias" : ""), s);
                Buf<float> out(n, off_first(s)), b(cols, off_rest(s));
                b.set(bv);
                const float* bp = null_bias ? nullptr : b.p;
                emulate_serial(grid_vec(n), BLOCK, [&] { ew::bias_broadcast(out.p, bp, rows, cols); });
                end(k, c, s, vec);
                std::vector<float> want(n);
                for (long long i = 0; i < n; i++) want[i] = null_bias ? 0.0f : bv[i % cols];
                exact(k, c, "out", out.get(), want);
                guards(k, c, out, b);
            }
            int rpp = std::max(1, rows / 2), np = (rows + rpp - 1) / rpp;
            {
                std::string k = "colsum_parts", c = begin(k, shape, s);
                Buf<float> parts((size_t)np * cols, off_first(s)), m(n, off_rest(s));
                m.set(mv);
                emulate_serial({grid_cols4(cols), (unsigned)np, 1}, BLOCK, [&] {
                    ew::colsum_parts(parts.p, m.p, rows, cols, rpp);
                });
                end(k, c, s, vec);
                std::vector<float> want((size_t)np * cols);
                for (int p = 0; p < np; p++)
                    for (int j = 0; j < cols; j++) {
                        float acc = 0.0f;
                        for (int r = p * rpp; r < std::min(rows, (p + 1) * rpp); r++) acc += mv[(size_t)r * cols + j];
                        want[(size_t)p * cols + j] = acc;
                    }
                exact(k, c, "parts", parts.get(), want);
                guards(k, c, parts, m);
            }
            // accumulate 0 (a pass that writes the gradients): dst is never read (NaN there
            // would show), and gets the bits adding to zeros gives.
            for (int stride_k : {1, 2})
                for (int accumulate : {1, 0}) {
                    std::string k = "reduce_parts_add";
                    std::string c = begin(k, shape + " stride " + std::to_string(stride_k) + "C" +
                                                 (accumulate ? "" : " overwrite"), s);
                    int stride = stride_k * cols;
                    auto pv = randn((size_t)rows * stride), d0 = randn(cols);
                    if (!accumulate) d0.assign(cols, NAN);
                    Buf<float> dst(cols, off_first(s)), parts(pv.size(), off_rest(s));
                    dst.set(d0);
                    parts.set(pv);
                    emulate_serial({grid_cols4(cols), 1, 1}, BLOCK, [&] {
                        ew::reduce_parts_add(dst.p, parts.p, rows, cols, stride, accumulate);
                    });
                    end(k, c, s, vec);
                    std::vector<float> want(cols);
                    for (int j = 0; j < cols; j++) {
                        float acc = 0.0f;
                        for (int p = 0; p < rows; p++) acc += pv[(size_t)p * stride + j];
                        want[j] = (accumulate ? d0[j] : 0.0f) + acc;
                    }
                    exact(k, c, "dst", dst.get(), want);
                    guards(k, c, dst, parts);
                }
        }
}

// ------------------------------------------------------------------ LayerNorm
static const std::vector<std::pair<int, int>> LN_SHAPES = {
    {1, 1}, {3, 2}, {5, 3}, {9, 4}, {2, 5}, {3, 7}, {9, 8}, {4, 33}, {3, 64}, {2, 130}, {10, 256}, {3, 768},
    {70, 96}, {33, 1024}, {2, 1030}};

struct LnOut {
    std::vector<float> out, mean, rstd;
};

// float64 LayerNorm of rows x c.
static void ref_layernorm(const std::vector<float>& x, const std::vector<float>& w,
                          const std::vector<float>* b, int rows, int c, std::vector<double>& out,
                          std::vector<double>& mean, std::vector<double>& rstd) {
    out.assign((size_t)rows * c, 0);
    mean.assign(rows, 0);
    rstd.assign(rows, 0);
    for (int r = 0; r < rows; r++) {
        const float* xr = &x[(size_t)r * c];
        double m = 0, v = 0;
        for (int j = 0; j < c; j++) m += xr[j];
        m /= c;
        for (int j = 0; j < c; j++) v += (xr[j] - m) * (xr[j] - m);
        double rs = 1.0 / std::sqrt(v / c + 1e-5);
        for (int j = 0; j < c; j++)
            out[(size_t)r * c + j] = (xr[j] - m) * rs * w[j] + (b ? (*b)[j] : 0.0);
        mean[r] = m;
        rstd[r] = rs;
    }
}

static void check_layernorm() {
    const double TOL = 2e-5;
    for (auto [rows, c] : LN_SHAPES)
        for (bool with_bias : {true, false}) {
            std::string shape = std::to_string(rows) + "x" + std::to_string(c) + (with_bias ? "" : " no bias");
            long long n = (long long)rows * c;
            auto x = randn(n, 1.5f), w = randn(c), bv = randn(c), dout = randn(n), dx0 = randn(n);
            for (auto& v : x) v += 0.5f;  // a non-zero mean
            auto a_in = randn(n), b_in = randn(n);
            std::vector<double> ro, rm, rr;
            ref_layernorm(x, w, with_bias ? &bv : nullptr, rows, c, ro, rm, rr);
            std::map<Sit, LnOut> by_sit;
            std::map<Sit, std::vector<float>> dx_by_sit;
            for (Sit s : {ALIGNED, SHIFTED, MIXED}) {
                bool vec = s == ALIGNED && c % 4 == 0;
                LnOut fw;
                {
                    std::string k = "layernorm_forward", cs = begin(k, shape, s);
                    Buf<float> out(n, off_first(s)), xb(n, off_rest(s)), wb(c, off_rest(s)), bb(c, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    xb.set(x), wb.set(w), bb.set(bv);
                    const float* bp = with_bias ? bb.p : nullptr;
                    emulate(grid_rows(rows), BLOCK, [&] {
                        ln::layernorm_forward(out.p, nullptr, mean.p, rstd.p, xb.p, wb.p, bp, rows, c);
                    });
                    end(k, cs, s, vec);
                    fw = {out.get(), mean.get(), rstd.get()};
                    within_tol(k, cs, "out", fw.out, ro, TOL);
                    within_tol(k, cs, "mean", fw.mean, rm, TOL);
                    within_tol(k, cs, "rstd", fw.rstd, rr, TOL);
                    guards(k, cs, out, xb, wb, bb, mean, rstd);
                    if (s != ALIGNED) {
                        exact(k, cs, "out vs aligned", fw.out, by_sit[ALIGNED].out);
                        exact(k, cs, "mean vs aligned", fw.mean, by_sit[ALIGNED].mean);
                        exact(k, cs, "rstd vs aligned", fw.rstd, by_sit[ALIGNED].rstd);
                    }
                    by_sit[s] = fw;
                }
                {
                    // Bit for bit the forward's output from its saved statistics.
                    std::string k = "layernorm_recompute", cs = begin(k, shape, s);
                    Buf<float> out(n, off_first(s)), xb(n, off_rest(s)), wb(c, off_rest(s)), bb(c, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    xb.set(x), wb.set(w), bb.set(bv), mean.set(fw.mean), rstd.set(fw.rstd);
                    const float* bp = with_bias ? bb.p : nullptr;
                    emulate_serial(grid_vec(n), BLOCK, [&] {
                        ln::layernorm_recompute(out.p, nullptr, xb.p, mean.p, rstd.p, wb.p, bp, rows, c);
                    });
                    end(k, cs, s, vec);
                    exact(k, cs, "out vs layernorm_forward", out.get(), fw.out);
                    guards(k, cs, out, xb, wb, bb, mean, rstd);
                }
                {
                    // bf16 outputs alone (the bf16 mode's LayerNorm outputs): the fp32
                    // output rounded by bf16_rne, bit for bit, from each of the three
                    // kernels; 8-byte vector stores where the rows allow.
                    std::vector<unsigned short> want(n);
                    for (long long i = 0; i < n; i++) want[i] = ref_bf16(fw.out[i]);
                    bool vec16 = s != MIXED && c % 4 == 0;  // bf16 first: 2-byte shift only
                    vec16 = vec && vec16;
                    {
                        std::string k = "layernorm_forward", cs = begin(k, shape + " bf16 out", s);
                        Buf<unsigned short> ob(n, off_first(s));
                        Buf<float> xb(n, off_rest(s)), wb(c, off_rest(s)), bb(c, off_rest(s));
                        Buf<float> mean(rows, 0), rstd(rows, 0);
                        xb.set(x), wb.set(w), bb.set(bv);
                        emulate(grid_rows(rows), BLOCK, [&] {
                            ln::layernorm_forward(nullptr, ob.p, mean.p, rstd.p, xb.p, wb.p,
                                                  with_bias ? bb.p : nullptr, rows, c);
                        });
                        end(k, cs, s, vec16);
                        exact(k, cs, "bf16 out", ob.get(), want);
                        exact(k, cs, "mean", mean.get(), fw.mean);
                        guards(k, cs, ob, xb, wb, bb, mean, rstd);
                    }
                    {
                        std::string k = "layernorm_recompute", cs = begin(k, shape + " bf16 out", s);
                        Buf<unsigned short> ob(n, off_first(s));
                        Buf<float> xb(n, off_rest(s)), wb(c, off_rest(s)), bb(c, off_rest(s));
                        Buf<float> mean(rows, 0), rstd(rows, 0);
                        xb.set(x), wb.set(w), bb.set(bv), mean.set(fw.mean), rstd.set(fw.rstd);
                        emulate_serial(grid_vec(n), BLOCK, [&] {
                            ln::layernorm_recompute(nullptr, ob.p, xb.p, mean.p, rstd.p, wb.p,
                                                    with_bias ? bb.p : nullptr, rows, c);
                        });
                        end(k, cs, s, vec16);
                        exact(k, cs, "bf16 out", ob.get(), want);
                        guards(k, cs, ob, xb, wb, bb, mean, rstd);
                    }
                    {
                        // res = x - a_in + a_in is not x in floats: feed a = x, b = 0.
                        std::string k = "residual_layernorm_forward", cs = begin(k, shape + " bf16 out", s);
                        Buf<float> res(n, off_first(s)), a(n, off_rest(s)), b(n, off_rest(s));
                        Buf<unsigned short> ob(n, off_rest(s));
                        Buf<float> wb(c, off_rest(s)), bb(c, off_rest(s)), mean(rows, 0), rstd(rows, 0);
                        a.set(x), b.set(std::vector<float>(n, 0.0f)), wb.set(w), bb.set(bv);
                        emulate(grid_rows(rows), BLOCK, [&] {
                            ln::residual_layernorm_forward(res.p, nullptr, ob.p, mean.p, rstd.p, a.p, b.p,
                                                           wb.p, with_bias ? bb.p : nullptr, rows, c);
                        });
                        end(k, cs, s, vec);
                        exact(k, cs, "bf16 out", ob.get(), want);
                        exact(k, cs, "res", res.get(), x);
                        guards(k, cs, res, a, b, ob, wb, bb, mean, rstd);
                    }
                }
                for (int alias : {0, 1, 2}) {  // res separate, res = a, res = b
                    std::string k = "residual_layernorm_forward";
                    std::string cs = begin(k, shape + (alias == 0 ? "" : alias == 1 ? " res=a" : " res=b"), s);
                    Buf<float> res(n, off_first(s)), out(n, off_rest(s)), a(n, off_rest(s)), b(n, off_rest(s));
                    Buf<float> wb(c, off_rest(s)), bb(c, off_rest(s)), mean(rows, 0), rstd(rows, 0);
                    float* ap = alias == 1 ? res.p : a.p;
                    float* bp2 = alias == 2 ? res.p : b.p;
                    Buf<float>& abuf = alias == 1 ? res : a;
                    Buf<float>& bbuf = alias == 2 ? res : b;
                    abuf.set(a_in), bbuf.set(b_in), wb.set(w), bb.set(bv);
                    const float* biasp = with_bias ? bb.p : nullptr;
                    emulate(grid_rows(rows), BLOCK, [&] {
                        ln::residual_layernorm_forward(res.p, out.p, nullptr, mean.p, rstd.p, ap, bp2, wb.p, biasp, rows, c);
                    });
                    end(k, cs, s, vec);
                    std::vector<float> sum(n);
                    for (long long i = 0; i < n; i++) sum[i] = a_in[i] + b_in[i];
                    exact(k, cs, "res", res.get(), sum);
                    // The same bits as layernorm_forward of the sum.
                    Buf<float> o2(n, 0), xb(n, 0), m2(rows, 0), r2(rows, 0), wb2(c, 0), bb2(c, 0);
                    xb.set(sum), wb2.set(w), bb2.set(bv);
                    emulate(grid_rows(rows), BLOCK, [&] {
                        ln::layernorm_forward(o2.p, nullptr, m2.p, r2.p, xb.p, wb2.p, with_bias ? bb2.p : nullptr, rows, c);
                    });
                    exact(k, cs, "out vs layernorm_forward", out.get(), o2.get());
                    exact(k, cs, "mean vs layernorm_forward", mean.get(), m2.get());
                    exact(k, cs, "rstd vs layernorm_forward", rstd.get(), r2.get());
                    guards(k, cs, res, out, a, b, wb, bb, mean, rstd);
                }
                {
                    std::string k = "layernorm_backward_dx", cs = begin(k, shape, s);
                    Buf<float> dx(n, off_first(s)), db(n, off_rest(s)), xb(n, off_rest(s)), wb(c, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    dx.set(dx0), db.set(dout), xb.set(x), wb.set(w), mean.set(fw.mean), rstd.set(fw.rstd);
                    emulate(grid_rows(rows), BLOCK, [&] {
                        ln::layernorm_backward_dx(dx.p, nullptr, db.p, nullptr, xb.p, wb.p, mean.p, rstd.p, rows, c);
                    });
                    end(k, cs, s, vec);
                    std::vector<double> want(n);
                    for (int r = 0; r < rows; r++) {
                        double a1 = 0, a2 = 0, m = fw.mean[r], rs = fw.rstd[r];
                        for (int j = 0; j < c; j++) {
                            size_t i = (size_t)r * c + j;
                            double norm = (x[i] - m) * rs, dn = (double)w[j] * dout[i];
                            a1 += dn;
                            a2 += dn * norm;
                        }
                        a1 /= c, a2 /= c;
                        for (int j = 0; j < c; j++) {
                            size_t i = (size_t)r * c + j;
                            double norm = (x[i] - m) * rs, dn = (double)w[j] * dout[i];
                            want[i] = dx0[i] + (dn - a1 - norm * a2) * rs;
                        }
                    }
                    auto got = dx.get();
                    within_tol(k, cs, "dx", got, want, TOL);
                    if (s != ALIGNED) exact(k, cs, "dx vs aligned", got, dx_by_sit[ALIGNED]);
                    dx_by_sit[s] = got;
                    guards(k, cs, dx, db, xb, wb, mean, rstd);
                }
                {
                    // With the bf16 copy of dx (the bf16 mode's residual-stream gradient for
                    // the next products): dx the same bits, the copy dx rounded by bf16_rne.
                    std::string k = "layernorm_backward_dx", cs = begin(k, shape + " bf16 copy", s);
                    Buf<float> dx(n, off_first(s)), db(n, off_rest(s)), xb(n, off_rest(s)), wb(c, off_rest(s));
                    Buf<unsigned short> dxb(n, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    dx.set(dx0), db.set(dout), xb.set(x), wb.set(w), mean.set(fw.mean), rstd.set(fw.rstd);
                    emulate(grid_rows(rows), BLOCK, [&] {
                        ln::layernorm_backward_dx(dx.p, dxb.p, db.p, nullptr, xb.p, wb.p, mean.p, rstd.p, rows, c);
                    });
                    end(k, cs, s, vec);
                    auto got = dx.get();
                    exact(k, cs, "dx vs without the copy", got, dx_by_sit[s]);
                    std::vector<unsigned short> want(n);
                    for (long long i = 0; i < n; i++) want[i] = ref_bf16(got[i]);
                    exact(k, cs, "bf16 copy", dxb.get(), want);
                    guards(k, cs, dx, dxb, db, xb, wb, mean, rstd);
                }
                if (c <= 1024) {
                    // The fused backward: dx and its bf16 copy the bits of
                    // layernorm_backward_dx; the blocks' partial sums, added in order as
                    // reduce_parts_add does, against float64.
                    std::string k = "layernorm_backward", cs = begin(k, shape, s);
                    unsigned nb = (unsigned)((rows + 31) / 32);
                    Buf<float> dx(n, off_first(s)), db(n, off_rest(s)), xb(n, off_rest(s)), wb(c, off_rest(s));
                    Buf<unsigned short> dxb(n, off_rest(s));
                    Buf<float> parts((size_t)nb * 2 * c, off_rest(s)), mean(rows, 0), rstd(rows, 0);
                    dx.set(dx0), db.set(dout), xb.set(x), wb.set(w), mean.set(fw.mean), rstd.set(fw.rstd);
                    emulate({nb, 1, 1}, BLOCK, [&] {
                        ln::layernorm_backward(dx.p, dxb.p, parts.p, db.p, nullptr, xb.p, wb.p, mean.p,
                                               rstd.p, rows, c);
                    });
                    end(k, cs, s, vec);
                    auto got = dx.get();
                    exact(k, cs, "dx vs layernorm_backward_dx", got, dx_by_sit[s]);
                    std::vector<unsigned short> want_b(n);
                    for (long long i = 0; i < n; i++) want_b[i] = ref_bf16(got[i]);
                    exact(k, cs, "bf16 copy", dxb.get(), want_b);
                    auto pv = parts.get();
                    std::vector<float> sums(2 * c, 0.0f);
                    for (unsigned p = 0; p < nb; p++)
                        for (int j = 0; j < 2 * c; j++) sums[j] += pv[(size_t)p * 2 * c + j];
                    std::vector<double> want(2 * c, 0.0);
                    for (int r = 0; r < rows; r++)
                        for (int j = 0; j < c; j++) {
                            size_t i = (size_t)r * c + j;
                            want[j] += ((double)x[i] - fw.mean[r]) * fw.rstd[r] * dout[i];
                            want[c + j] += dout[i];
                        }
                    within_tol(k, cs, "dw, db", sums, want, TOL);
                    guards(k, cs, dx, dxb, parts, db, xb, wb, mean, rstd);
                }
                {
                    std::string k = "layernorm_backward_parts", cs = begin(k, shape, s);
                    int rpp = std::max(1, rows / 3), np = (rows + rpp - 1) / rpp;
                    Buf<float> parts((size_t)np * 2 * c, off_first(s)), db(n, off_rest(s)), xb(n, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    db.set(dout), xb.set(x), mean.set(fw.mean), rstd.set(fw.rstd);
                    emulate_serial({grid_cols4(c), (unsigned)np, 1}, BLOCK, [&] {
                        ln::layernorm_backward_parts(parts.p, db.p, nullptr, xb.p, mean.p, rstd.p, rows, c, rpp);
                    });
                    end(k, cs, s, vec);
                    std::vector<float> want((size_t)np * 2 * c);
                    for (int p = 0; p < np; p++)
                        for (int j = 0; j < c; j++) {
                            float dw = 0.0f, dbs = 0.0f;
                            for (int r = p * rpp; r < std::min(rows, (p + 1) * rpp); r++) {
                                size_t i = (size_t)r * c + j;
                                dw += (x[i] - fw.mean[r]) * fw.rstd[r] * dout[i];
                                dbs += dout[i];
                            }
                            want[(size_t)p * 2 * c + j] = dw;
                            want[(size_t)p * 2 * c + c + j] = dbs;
                        }
                    exact(k, cs, "parts", parts.get(), want);
                    guards(k, cs, parts, db, xb, mean, rstd);
                }
                {
                    // dout in bf16 (the bf16 mode's gradient of a LayerNorm output as the
                    // products write it, switch bf16_dln): each backward kernel gives the bits
                    // it gives for the same values widened to fp32 in dout.
                    std::vector<unsigned short> dh(n);
                    std::vector<float> dwide(n);
                    for (long long i = 0; i < n; i++) dh[i] = ref_bf16(dout[i]), dwide[i] = ref_widen(dh[i]);
                    const std::string sh = shape + " bf16 dout";
                    Buf<float> df(n, off_rest(s)), xb(n, off_rest(s)), wb(c, off_rest(s));
                    Buf<unsigned short> dhb(n, off_rest(s));
                    Buf<float> mean(rows, 0), rstd(rows, 0);
                    df.set(dwide), dhb.set(dh), xb.set(x), wb.set(w), mean.set(fw.mean), rstd.set(fw.rstd);
                    // Runs `launch(dout, dout_bf16)` with dout given one way, then the other.
                    auto both = [&](const std::string& k, auto&& launch) {
                        std::string cs = begin(k, sh, s);
                        auto ref = launch(df.p, (const unsigned short*)nullptr);
                        vec_accesses = 0;
                        auto got = launch((const float*)nullptr, (const unsigned short*)dhb.p);
                        end(k, cs, s, vec);
                        for (size_t o = 0; o < got.size(); o++) exact(k, cs, "vs fp32 dout", got[o], ref[o]);
                        guards(k, cs, df, dhb, xb, wb, mean, rstd);
                    };
                    both("layernorm_backward_dx", [&](const float* d, const unsigned short* dhp) {
                        Buf<float> dx(n, off_first(s));
                        Buf<unsigned short> dxb(n, off_rest(s));
                        dx.set(dx0);
                        emulate(grid_rows(rows), BLOCK, [&] {
                            ln::layernorm_backward_dx(dx.p, dxb.p, d, dhp, xb.p, wb.p, mean.p, rstd.p, rows, c);
                        });
                        return std::vector<std::vector<float>>{dx.get(), widened(dxb.get())};
                    });
                    if (c <= 1024)
                        both("layernorm_backward", [&](const float* d, const unsigned short* dhp) {
                            unsigned nb = (unsigned)((rows + 31) / 32);
                            Buf<float> dx(n, off_first(s)), parts((size_t)nb * 2 * c, off_rest(s));
                            Buf<unsigned short> dxb(n, off_rest(s));
                            dx.set(dx0);
                            emulate({nb, 1, 1}, BLOCK, [&] {
                                ln::layernorm_backward(dx.p, dxb.p, parts.p, d, dhp, xb.p, wb.p, mean.p,
                                                       rstd.p, rows, c);
                            });
                            return std::vector<std::vector<float>>{dx.get(), widened(dxb.get()), parts.get()};
                        });
                    both("layernorm_backward_parts", [&](const float* d, const unsigned short* dhp) {
                        int rpp = std::max(1, rows / 3), np = (rows + rpp - 1) / rpp;
                        Buf<float> parts((size_t)np * 2 * c, off_first(s));
                        emulate_serial({grid_cols4(c), (unsigned)np, 1}, BLOCK, [&] {
                            ln::layernorm_backward_parts(parts.p, d, dhp, xb.p, mean.p, rstd.p, rows, c, rpp);
                        });
                        return std::vector<std::vector<float>>{parts.get()};
                    });
                }
            }
        }
}

// ------------------------------------------------------------------ cross-entropy
// Float64 reference: row losses wl and gradients wg (0 for rows with target -1).
static void ref_xent(const std::vector<float>& x, const std::vector<int>& tg, int v, float grad_k,
                     std::vector<double>& wl, std::vector<double>& wg) {
    int rows = (int)tg.size();
    wl.assign(rows, 0.0), wg.assign(x.size(), 0.0);
    for (int r = 0; r < rows; r++) {
        if (tg[r] < 0) continue;
        const float* xr = &x[(size_t)r * v];
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < v; j++) mx = std::max(mx, (double)xr[j]);
        for (int j = 0; j < v; j++) sum += std::exp(xr[j] - mx);
        wl[r] = mx + std::log(sum) - xr[tg[r]];
        for (int j = 0; j < v; j++)
            wg[(size_t)r * v + j] = grad_k * (std::exp(xr[j] - mx) / sum - (j == tg[r] ? 1.0 : 0.0));
    }
}

static void check_cross_entropy() {
    const double TOL = 2e-5;
    const int rows = 5;
    // V > 4 * XENT_THREADS: threads take several groups, their running max grows along
    // the row (GPT-2's 50257: 12 or 13 groups a thread).
    for (int v : {1, 2, 3, 4, 5, 7, 8, 50, 257, 1027, 2053, 9001, 50257})
        for (Sit s : {ALIGNED, SHIFTED})
            for (int write_grad : {1, 0}) {
                std::string k = "cross_entropy_forward_backward";
                std::string cs = begin(k, "V=" + std::to_string(v) + (write_grad ? "" : " loss only"), s);
                long long n = (long long)rows * v;
                auto x = randn(n, 3.0f);
                std::vector<int> tg(rows);
                for (int r = 0; r < rows; r++) tg[r] = r == 2 ? -1 : (int)((r * 7919u + 13u) % (unsigned)v);
                Buf<float> lg(n, off_first(s));
                Buf<double> loss(rows, 0);
                Buf<int> tb(rows, 0);
                lg.set(x), tb.set(tg);
                float grad_k = 0.25f;
                emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
                    xent::cross_entropy_forward_backward(lg.p, nullptr, loss.p, tb.p, rows, v, v, grad_k, write_grad);
                });
                // Some row that loads its logits has a whole aligned group.
                bool expect = false;
                for (int r = 0; r < rows; r++)
                    if (tg[r] >= 0 || write_grad)
                        expect |= shift_vec(v, (off_first(s) + (size_t)r * v) % 4);
                end(k, cs, s, expect);
                std::vector<double> wl, wg;
                ref_xent(x, tg, v, grad_k, wl, wg);
                std::vector<float> lf;
                for (double l : loss.get()) lf.push_back((float)l);
                within_tol(k, cs, "row loss", lf, wl, TOL);
                if (write_grad) {
                    // Relative to the gradient's scale grad_k (its entries are at most grad_k).
                    auto got = lg.get();
                    std::vector<float> gs(n);
                    std::vector<double> ws(n);
                    for (long long i = 0; i < n; i++) gs[i] = got[i] / grad_k, ws[i] = wg[i] / grad_k;
                    within_tol(k, cs, "logit gradient / grad_k", gs, ws, TOL);
                    // The bf16 gradient (the bf16 mode): the fp32 gradient above rounded by
                    // bf16_rne, bit for bit, the logits untouched, the same row losses.
                    std::string cb = begin(k, "V=" + std::to_string(v) + " bf16 gradient", s);
                    Buf<float> lg2(n, off_first(s));
                    Buf<unsigned short> gb(n, off_first(s));
                    Buf<double> loss2(rows, 0);
                    lg2.set(x);
                    emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
                        xent::cross_entropy_forward_backward(lg2.p, gb.p, loss2.p, tb.p, rows, v, v, grad_k, 1);
                    });
                    end(k, cb, s, expect);
                    std::vector<unsigned short> want(n);
                    for (long long i = 0; i < n; i++) want[i] = ref_bf16(got[i]);
                    exact(k, cb, "bf16 gradient", gb.get(), want);
                    exact(k, cb, "logits", lg2.get(), x);
                    exact(k, cb, "row loss", loss2.get(), loss.get());
                    guards(k, cb, lg2, gb, loss2);
                } else {
                    exact(k, cs, "logits (no gradient asked)", lg.get(), x);
                }
                guards(k, cs, lg, loss, tb);
            }
}

// Logits a linear layer does not give but a caller might: -inf logits take no share of
// the softmax (a finite loss, a zero gradient there) whether or not a thread has met a
// finite logit before them; a NaN logit makes the row's loss NaN, not a finite number that
// hides it.
static void check_cross_entropy_special_values() {
    const int rows = 3, v = 9001;
    std::string k = "cross_entropy_forward_backward";
    std::string cs = begin(k, "V=9001, -inf and NaN logits", ALIGNED);
    auto x = randn((size_t)rows * v, 3.0f);
    // Row 0: -inf on every thread's first group and on a stretch in the middle; row 1: as
    // row 0 plus one NaN; row 2: plain.
    for (int r = 0; r < 2; r++) {
        for (int j = 0; j < 4 * XENT_THREADS; j += 3) x[(size_t)r * v + j] = -INFINITY;
        for (int j = 6000; j < 6100; j++) x[(size_t)r * v + j] = -INFINITY;
    }
    x[(size_t)1 * v + 7777] = NAN;
    std::vector<int> tg = {5, 5, 5};
    Buf<float> lg(x.size(), 0);
    Buf<double> loss(rows, 0);
    Buf<int> tb(rows, 0);
    lg.set(x), tb.set(tg);
    const float grad_k = 0.5f;
    emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
        xent::cross_entropy_forward_backward(lg.p, nullptr, loss.p, tb.p, rows, v, v, grad_k, 1);
    });
    end(k, cs, ALIGNED, true);
    std::vector<double> wl, wg;
    ref_xent(x, tg, v, grad_k, wl, wg);
    auto got_loss = loss.get();
    auto got = lg.get();
    if (!std::isfinite(got_loss[0]) || std::fabs(got_loss[0] - wl[0]) > 2e-5 * std::fabs(wl[0]) + 2e-5)
        fail(k, cs + ": row with -inf logits: loss " + std::to_string(got_loss[0]) + ", want " + std::to_string(wl[0]));
    for (int j = 0; j < v; j++)
        if (x[j] == -INFINITY && got[j] != 0.0f) {
            fail(k, cs + ": a -inf logit's gradient is not 0");
            break;
        }
    if (!std::isnan(got_loss[1])) fail(k, cs + ": a NaN logit left the loss at " + std::to_string(got_loss[1]));
    if (std::fabs(got_loss[2] - wl[2]) > 2e-5 * std::fabs(wl[2]) + 2e-5)
        fail(k, cs + ": plain row: loss " + std::to_string(got_loss[2]) + ", want " + std::to_string(wl[2]));
}

// cross_entropy_bf16 (bf16 logits, the gradient rounded to bf16 in place) against
// cross_entropy_forward_backward on a float copy of the widened logits. Both buffers start
// `off` elements past an aligned boundary (16 bytes for fp32, 8 for bf16), so every row has
// the same shift in both and the fp32 kernel takes the same groups, per-thread order and
// arithmetic: the row losses bit for bit, the gradient bit for bit the bf16 rounding of the
// fp32 one (zero in rows with target -1); both also against float64. off = 0..3 puts the
// first row at every shift, and the later rows at the others when V is not a multiple of 4.
static void check_cross_entropy_bf16() {
    const int rows = 6;
    const float GRAD_K[] = {0.25f, 1.0f / 3.0f, 1024.0f / 5.0f, 1.0f};
    for (int v : {1, 2, 3, 4, 5, 7, 8, 50, 257, 1024, 2053, 4099})
        for (size_t off : {0, 1, 2, 3})
            for (int write_grad : {1, 0}) {
                std::string k = "cross_entropy_bf16";
                Sit s = off ? SHIFTED : ALIGNED;
                std::string cs = begin(k, "V=" + std::to_string(v) + " off=" + std::to_string(off) +
                                              (write_grad ? "" : " loss only"), s);
                long long n = (long long)rows * v;
                float grad_k = GRAD_K[off];
                // Targets: first and last logit, two rows without loss; a -inf logit in row 4.
                std::vector<int> tg(rows);
                for (int r = 0; r < rows; r++)
                    tg[r] = r == 2 || r == 5 ? -1 : r == 0 ? 0 : r == 1 ? v - 1 : (int)((r * 7919u + 13u) % (unsigned)v);
                auto x = randn(n, 3.0f);
                std::vector<unsigned short> xb(n);
                std::vector<float> xw(n);
                for (long long i = 0; i < n; i++) xb[i] = ref_bf16(x[i]);
                if (v > 1) xb[(size_t)4 * v + (tg[4] + 1) % v] = 0xff80;
                for (long long i = 0; i < n; i++) xw[i] = ref_widen(xb[i]);
                Buf<unsigned short> lg(n, off);
                Buf<double> loss(rows, 0);
                Buf<int> tb(rows, 0);
                lg.set(xb), tb.set(tg);
                emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
                    xent::cross_entropy_bf16(lg.p, loss.p, tb.p, rows, v, v, grad_k, write_grad);
                });
                bool expect = false;
                for (int r = 0; r < rows; r++)
                    if (tg[r] >= 0 || write_grad) expect |= shift_vec(v, (off + (size_t)r * v) % 4);
                end(k, cs, s, expect);
                Buf<float> lf(n, off);
                Buf<double> lossf(rows, 0);
                lf.set(xw);
                check(vec_shift(lf.p, 4) == vec_shift(lg.p, 2), k, cs + ": fp32 copy at another shift");
                emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
                    xent::cross_entropy_forward_backward(lf.p, nullptr, lossf.p, tb.p, rows, v, v, grad_k, write_grad);
                });
                std::vector<double> wl, wg;
                ref_xent(xw, tg, v, grad_k, wl, wg);
                exact(k, cs, "row loss vs the fp32 kernel", loss.get(), lossf.get());
                std::vector<float> lfl;
                for (double l : loss.get()) lfl.push_back((float)l);
                within_tol(k, cs, "row loss", lfl, wl, 2e-5);
                auto got = lg.get();
                if (write_grad) {
                    auto g32 = lf.get();
                    std::vector<unsigned short> want(n);
                    for (long long i = 0; i < n; i++) want[i] = tg[i / v] < 0 ? 0 : ref_bf16(g32[i]);
                    exact(k, cs, "bf16 gradient vs the fp32 kernel", got, want);
                    // Each within half a bf16 ulp of float64, plus fp32 slack.
                    for (long long i = 0; i < n; i++) {
                        int e;
                        std::frexp(wg[i], &e);
                        double tol = (wg[i] == 0 ? 0 : std::ldexp(1.0, e - 9)) + 1e-5 * std::fabs(wg[i]) + 1e-6 * grad_k;
                        if (!(std::fabs(ref_widen(got[i]) - wg[i]) <= tol)) {
                            fail(k, cs + ": bf16 gradient off float64 by over half a bf16 ulp at element " +
                                        std::to_string(i) + " (got " + std::to_string(ref_widen(got[i])) +
                                        ", want " + std::to_string(wg[i]) + ")");
                            break;
                        }
                    }
                } else {
                    exact(k, cs, "logits (no gradient asked)", got, xb);
                }
                guards(k, cs, lg, loss, tb, lf, lossf);
            }
}

// Rows `ld` > V apart (the engine pads the logits' row stride to a multiple of 8): the
// three forms (fp32 in place, fp32 with a bf16 gradient, bf16 in place) give each row the
// bits that row gets on its own (ld = V, one row, at the same alignment: a multiple-of-8
// stride keeps every row at the first row's shift), and leave the padding as it was.
static void check_cross_entropy_ld() {
    const int rows = 4;
    const float grad_k = 0.25f;
    for (int v : {1, 5, 50, 257, 2053})
        for (size_t off : {0, 1}) {
            int ld = (v + 7) / 8 * 8 + (v % 8 == 0 ? 8 : 0);  // always past V
            std::string k = "cross_entropy_bf16";
            Sit s = off ? SHIFTED : ALIGNED;
            std::string cs = begin(k, "V=" + std::to_string(v) + " ld=" + std::to_string(ld), s);
            long long np = (long long)rows * ld;
            std::vector<int> tg(rows);
            for (int r = 0; r < rows; r++) tg[r] = r == 2 ? -1 : (int)((r * 7919u + 13u) % (unsigned)v);
            auto x = randn((long long)rows * v, 3.0f);
            std::vector<unsigned short> xbp(np, 0x7fc1);
            std::vector<float> xp(np, NAN);
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < v; j++) {
                    xbp[(size_t)r * ld + j] = ref_bf16(x[(size_t)r * v + j]);
                    xp[(size_t)r * ld + j] = x[(size_t)r * v + j];
                }
            Buf<int> tb(rows, 0);
            tb.set(tg);
            Buf<unsigned short> pb(np, off), pgb(np, off);
            Buf<float> pf(np, off), pf2(np, off);
            Buf<double> q1(rows, 0), q2(rows, 0), q3(rows, 0);
            pb.set(xbp), pf.set(xp), pf2.set(xp), pgb.set(std::vector<unsigned short>(np, 0x7fc1));
            emulate({(unsigned)rows, 1, 1}, XENT_THREADS, [&] {
                xent::cross_entropy_bf16(pb.p, q1.p, tb.p, rows, v, ld, grad_k, 1);
                xent::cross_entropy_forward_backward(pf.p, nullptr, q2.p, tb.p, rows, v, ld, grad_k, 1);
                xent::cross_entropy_forward_backward(pf2.p, pgb.p, q3.p, tb.p, rows, v, ld, grad_k, 1);
            });
            end(k, cs, s, shift_vec(v, off));
            auto [gb1, gf2, gb3, gl] = std::tuple{pb.get(), pf.get(), pgb.get(), pf2.get()};
            auto [r1, r2, r3] = std::tuple{q1.get(), q2.get(), q3.get()};
            for (int r = 0; r < rows; r++) {
                // Row r alone, packed, at the same shift.
                std::vector<unsigned short> xb1(xbp.begin() + (long)r * ld, xbp.begin() + (long)r * ld + v);
                std::vector<float> xf1(xp.begin() + (long)r * ld, xp.begin() + (long)r * ld + v);
                Buf<unsigned short> ob(v, off), og(v, off);
                Buf<float> of(v, off), of2(v, off);
                Buf<double> o1(1, 0), o2(1, 0), o3(1, 0);
                Buf<int> ot(1, 0);
                ob.set(xb1), of.set(xf1), of2.set(xf1), ot.set(std::vector<int>{tg[r]});
                emulate({1, 1, 1}, XENT_THREADS, [&] {
                    xent::cross_entropy_bf16(ob.p, o1.p, ot.p, 1, v, v, grad_k, 1);
                    xent::cross_entropy_forward_backward(of.p, nullptr, o2.p, ot.p, 1, v, v, grad_k, 1);
                    xent::cross_entropy_forward_backward(of2.p, og.p, o3.p, ot.p, 1, v, v, grad_k, 1);
                });
                std::string cr = cs + " row " + std::to_string(r);
                exact(k, cr, "row loss, bf16", std::vector<double>{r1[r]}, o1.get());
                exact(k, cr, "row loss, fp32", std::vector<double>{r2[r]}, o2.get());
                exact(k, cr, "row loss, bf16 gradient", std::vector<double>{r3[r]}, o3.get());
                auto row = [&](const auto& all) {
                    using T = typename std::decay_t<decltype(all)>::value_type;
                    return std::vector<T>(all.begin() + (long)r * ld, all.begin() + (long)r * ld + v);
                };
                exact(k, cr, "bf16 gradient in place", row(gb1), ob.get());
                exact(k, cr, "fp32 gradient in place", row(gf2), of.get());
                exact(k, cr, "bf16 gradient", row(gb3), og.get());
                exact(k, cr, "logits under a bf16 gradient", row(gl), of2.get());
                // The padding: as it was.
                for (int j = v; j < ld; j++) {
                    size_t i = (size_t)r * ld + j;
                    bool kept = gb1[i] == 0x7fc1 && gb3[i] == 0x7fc1 && std::isnan(gf2[i]) &&
                                std::isnan(gl[i]);
                    check(kept, k, cr + ": padding column " + std::to_string(j) + " written");
                }
            }
            guards(k, cs, pb, pgb, pf, pf2, tb);
        }
}

// ------------------------------------------------------------------ embedding, KV cache
static void check_embedding() {
    const int vocab = 11;
    for (auto [b, t, c] : std::vector<std::tuple<int, int, int>>{
             {1, 1, 1}, {2, 3, 2}, {1, 5, 3}, {2, 2, 4}, {3, 2, 5}, {1, 3, 7}, {2, 4, 8}, {2, 3, 33}, {2, 5, 64}, {3, 2, 130}, {4, 16, 64}, {8, 80, 12}, {5, 131, 7}})
        for (Sit s : {ALIGNED, SHIFTED, MIXED}) {
            std::string shape = std::to_string(b) + "x" + std::to_string(t) + "x" + std::to_string(c);
            int n = b * t;
            long long nc = (long long)n * c;
            std::vector<unsigned> tok(n);
            for (int i = 0; i < n; i++) tok[i] = (unsigned)((i * 5 + 3) % vocab);  // repeats
            auto wte = randn((size_t)vocab * c), wpe = randn((size_t)t * c), dx = randn(nc);
            bool vec = s == ALIGNED && c % 4 == 0;
            {
                std::string k = "embedding_forward", cs = begin(k, shape, s);
                Buf<float> x(nc, off_first(s)), we(wte.size(), off_rest(s)), wp(wpe.size(), off_rest(s));
                Buf<unsigned> tb(n, 0);
                we.set(wte), wp.set(wpe), tb.set(tok);
                emulate_serial(grid_vec(nc), BLOCK, [&] { emb::embedding_forward(x.p, tb.p, we.p, wp.p, n, t, c); });
                end(k, cs, s, vec);
                std::vector<float> want(nc);
                for (int r = 0; r < n; r++)
                    for (int j = 0; j < c; j++)
                        want[(size_t)r * c + j] = wte[(size_t)tok[r] * c + j] + wpe[(size_t)(r % t) * c + j];
                exact(k, cs, "x", x.get(), want);
                guards(k, cs, x, we, wp, tb);
            }
            // The token-embedding gradient adds each token's rows in row order, as the CPU
            // engine does: the same bits whichever order the blocks run in (atomics would
            // add repeated tokens in block order and fail the reversed run). Skewed: token 0
            // on 7 rows of 10, as a frequent token of real text on a smaller scale, so that
            // its rows span several index chunks and end in a partial group of loads.
            for (bool skewed : {false, true})
                for (bool reversed : {false, true}) {
                    std::string k = "embedding_backward_wte",
                                cs = begin(k, shape + (skewed ? ", skewed" : "") + (reversed ? ", blocks reversed" : ""), s);
                    std::vector<unsigned> tk = tok;
                    if (skewed)
                        for (int i = 0; i < n; i++)
                            if (i % 10 < 7) tk[i] = 0;
                    auto d0 = randn((size_t)vocab * c);
                    Buf<float> dw(d0.size(), off_first(s)), dxb(nc, s == MIXED ? 0 : off_first(s));
                    auto table = token_rows(tk);
                    Buf<unsigned> tb(table.size(), 0);
                    dw.set(d0), dxb.set(dx), tb.set(table);
                    // The engine's launch (src/engine/cuda/embedding.rs, wte_launch): one
                    // thread per group of four channels, whole warps, at most 256 a block.
                    unsigned shift = (unsigned)((uintptr_t)dw.p % 16 / 4);
                    unsigned groups = (unsigned)((c + shift + 3) / 4);
                    unsigned block = std::min(256u, (groups + 31) / 32 * 32);
                    emu_blocks_reversed = reversed;
                    emulate({(unsigned)n, (groups + block - 1) / block, 1}, block,
                            [&] { emb::embedding_backward_wte(dw.p, dxb.p, tb.p, n, c); });
                    emu_blocks_reversed = false;
                    end(k, cs, s, s != MIXED && c % 4 == 0 && shift_vec(c, off_first(s)));
                    std::vector<float> want = d0;
                    for (int r = 0; r < n; r++)
                        for (int j = 0; j < c; j++) want[(size_t)tk[r] * c + j] += dx[(size_t)r * c + j];
                    exact(k, cs, "dwte", dw.get(), want);
                    guards(k, cs, dw, dxb, tb);
                }
            // accumulate 0: dwpe never read (NaN there would show), the bits of adding to zeros.
            for (int accumulate : {1, 0}) {
                std::string k = "embedding_backward_wpe", cs = begin(k, shape + (accumulate ? "" : " overwrite"), s);
                auto d0 = randn((size_t)t * c);
                if (!accumulate) d0.assign(d0.size(), NAN);
                long long tc = (long long)t * c;
                Buf<float> dw(tc, off_first(s)), dxb(nc, off_rest(s));
                dw.set(d0), dxb.set(dx);
                emulate_serial(grid_vec(tc), BLOCK,
                               [&] { emb::embedding_backward_wpe(dw.p, dxb.p, b, t, c, accumulate); });
                end(k, cs, s, s != MIXED && tc % 4 == 0 && shift_vec(tc, off_first(s)));
                std::vector<float> want(tc);
                for (long long i = 0; i < tc; i++) {
                    float acc = 0.0f;
                    for (int bi = 0; bi < b; bi++) acc += dx[(size_t)bi * tc + i];
                    want[i] = (accumulate ? d0[i] : 0.0f) + acc;
                }
                exact(k, cs, "dwpe", dw.get(), want);
                guards(k, cs, dw, dxb);
            }
            {
                // KV append: n_seq = b sequences of nq = t new rows at pos0 = 2, T_MAX = t + 3.
                std::string k = "decode_kv_append", cs = begin(k, shape, s);
                int nq = t, pos0 = 2, tmax = t + 3, rows = b * nq;
                auto qkv = randn((size_t)rows * 3 * c), k0 = randn((size_t)b * tmax * c), v0 = randn(k0.size());
                Buf<float> kc(k0.size(), off_first(s)), vc(k0.size(), off_rest(s)), qb(qkv.size(), off_rest(s));
                kc.set(k0), vc.set(v0), qb.set(qkv);
                emulate_serial(grid_vec((long long)rows * c), BLOCK, [&] {
                    dec::decode_kv_append(kc.p, vc.p, qb.p, rows, nq, pos0, tmax, c);
                });
                end(k, cs, s, vec);
                std::vector<float> wk = k0, wv = v0;
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < c; j++) {
                        size_t dst = ((size_t)(r / nq) * tmax + pos0 + r % nq) * c + j;
                        wk[dst] = qkv[(size_t)r * 3 * c + c + j];
                        wv[dst] = qkv[(size_t)r * 3 * c + 2 * c + j];
                    }
                exact(k, cs, "k cache", kc.get(), wk);
                exact(k, cs, "v cache", vc.get(), wv);
                guards(k, cs, kc, vc, qb);
            }
        }
}

int main() {
    check_unary();
    check_adamw();
    check_sumsq();
    check_columns();
    check_layernorm();
    check_cross_entropy();
    check_cross_entropy_special_values();
    check_embedding();
    check_gelu_bf16();  // last: the earlier checks draw the same random data as without it
    check_cross_entropy_bf16();  // after them for the same reason
    check_cross_entropy_ld();
    check_gelu_reference();
    for (auto& [name, t] : tallies) {
        char err[64];
        if (t.exact)
            std::snprintf(err, sizeof err, "bit-exact");
        else
            std::snprintf(err, sizeof err, "worst error %.2e", t.worst);
        std::printf("%s %s: %d cases, %s, %lld vector accesses in the aligned cases\n",
                    t.fails ? "FAIL" : "ok  ", name.c_str(), t.cases, err, t.vec);
    }
    std::printf("%s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
