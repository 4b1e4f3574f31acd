// main.cpp: checks the kernels of kernels/flash_attention.cu on the CPU (see shim.h)
// against a float64 causal attention, forward and backward, for several shapes and tile
// sizes. Build and run with tools/flash_emulate/run.sh; prints one line per case, then
// PASS or FAIL, and exits non-zero on failure.
//
// Errors are max |got - want| / max |want| per tensor ("max"), and for the bf16 backward
// also ||got - want||_2 / ||want||_2 ("L2").
// - fp32 kernels vs float64: 1e-4 (fp32 sums of at most T + hs terms; ~1e-6 measured).
// - bf16 forward (y, lse) vs float64: 2e-2 (q, k, v, P rounded to bf16: 2^-9 relative per
//   operand, ~3e-3 of scale after the rounding errors of a dot partly cancel).
// - bf16 backward (dq, dk, dv) vs float64 and vs the fp32 kernels: max 2e-2 and L2 2e-2.
//   Each gradient is a sum of products whose operands (q, k, v, dy, and P or dS) are each
//   rounded once to bf16 (relative error <= 2^-9, RMS 2^-9 / sqrt(3) = 1.1e-3); dS = P (dP
//   - D) also carries the rounding of dP's operands, and where dP - D cancels that error
//   is relative to |dP|, not |dP - D|. Independent errors add in quadrature, giving a few
//   1e-3 of scale (measured worst: see the output); an indexing, mask or layout mistake
//   is O(1).
// - bf16 backward vs a float64 reference with the kernels' own rounding (q, k, v, dy
//   rounded to bf16; P and dS rounded to bf16 as product operands; the lse and D the
//   kernels read): 2e-3 max. What remains is fp32 accumulation against float64 and the
//   rare P or dS that rounds to the neighbouring bf16 value, so this bound is ten times
//   tighter and checks the fragment layouts and masks element by element.
// - bf16 backward with a bf16 gradient (dqkv_bf16): the fp32 gradient rounded to nearest
//   even, bit for bit.
// - bf16 storage (the _io kernels and flash_attn_bwd_dot_bf16: qkv, y, dy and dqkv in bf16):
//   with qkv and dy rounded to bf16, bit for bit against the fp32-storage bf16 kernels given
//   the same values widened: y is flash_attn_fwd_bf16's y rounded and lse the same; D from
//   the bf16 y and dy is flash_attn_bwd_dot's on them widened; dq, dk, dv (from that lse
//   and D) are the fp32-storage backward's bf16 output. No tolerance: both forms run the
//   same arithmetic on the same bf16 operands, so any difference is a load or store mistake.
// - synchronous tile loads (the _io_sync kernels, the flash_async switch off) against the
//   cp.async loads of the io kernels: bit for bit, generic and head-size-64 forms. run.sh
//   runs every case under three schedules of the copies and warps (see run.sh).
#include "shim.h"
#include "../../kernels/common.cuh"  // (as the engine compiles it: KERNEL_IN_PART)
#include "../../kernels/flash_attention.cu"
#include <cstdio>
#include <random>
#include <string>

struct Case { int B, T, NH, hs, br, bc, bt; };

// The bf16 forward's grid (FB_ROWS query rows per block, FB_THREADS threads) and the bf16
// dq kernel's (FBB_DQ_ROWS, FBB_DQ_THREADS); the dk/dv kernel takes 64 rows per block and
// 128 threads.
static dim3 fwd_grid(const Case& cs) {
    return {(unsigned)((cs.T + FB_ROWS - 1) / FB_ROWS), (unsigned)cs.NH, (unsigned)cs.B};
}
static dim3 dq_grid(const Case& cs) {
    return {(unsigned)((cs.T + FBB_DQ_ROWS - 1) / FBB_DQ_ROWS), (unsigned)cs.NH, (unsigned)cs.B};
}

// The bf16-storage backward: dk and dv, then dq, of qkv `qb` and gradient `dyb` (bf16 bits)
// into `out`, by the kernels `dkdv` and `dq` (one of the _io forms), from lse and D.
template <class Dkdv, class Dq>
static void bwd_io(const Case& cs, Dkdv dkdv, Dq dq, const unsigned short* qb,
                   const unsigned short* dyb, const float* lse, const float* dvec,
                   unsigned short* out) {
    int T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    dim3 grid{(unsigned)((T + 63) / 64), (unsigned)NH, (unsigned)cs.B};
    emulate(grid, 128, [&] { dkdv(qb, dyb, lse, dvec, out, T, C, NH, scale); });
    emulate(dq_grid(cs), FBB_DQ_THREADS, [&] { dq(qb, dyb, lse, dvec, out, T, C, NH, scale); });
}

// `floor` bounds the denominator from below (see main: tensors whose exact value is 0).
static double rel(const std::vector<float>& got, const std::vector<double>& want,
                  double floor = 1e-30) {
    double num = 0, den = floor;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        num = std::max(num, std::fabs(got[i] - want[i]));
        den = std::max(den, std::fabs(want[i]));
    }
    return num / den;
}

static double rel_l2(const std::vector<float>& got, const std::vector<double>& want,
                     double floor = 0) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) return INFINITY;
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return std::sqrt(num / std::max(den, std::max(floor * floor, 1e-300)));
}

static std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

static float round_bf16(float x) { return bf2f(fa_f2bf(x)); }

// One third (part 0 = q, 1 = k, 2 = v) of a (B*T, 3C) tensor, as (B*T, C).
template <class T>
static std::vector<T> third(const std::vector<T>& v, int C, int part) {
    std::vector<T> out;
    for (size_t r = 0; r < v.size() / (3 * C); r++)
        out.insert(out.end(), v.begin() + r * 3 * C + part * C, v.begin() + r * 3 * C + (part + 1) * C);
    return out;
}

// float64 causal attention backward of qkv (B*T, 3C) and dy (B*T, C). With `lse_in` and
// `d_in` (the kernels' lse and D) and `round_pds`, it models the bf16 kernels: P from
// lse_in, D from d_in, P and dS rounded to bf16 as product operands (the caller passes
// q, k, v and dy already rounded). Otherwise exact: returns y, lse and dqkv.
static void reference(int B, int T, int NH, int hs, const std::vector<float>& qkv,
                      const std::vector<float>& dy, const float* lse_in, const float* d_in,
                      bool round_pds, std::vector<double>& y, std::vector<double>& lse,
                      std::vector<double>& dqkv) {
    int C = NH * hs;
    double scale = 1.0 / std::sqrt((double)hs);
    y.assign(dy.size(), 0.0);
    lse.assign((size_t)B * NH * T, 0.0);
    dqkv.assign(qkv.size(), 0.0);
    auto rb = [&](double x) { return round_pds ? (double)round_bf16((float)x) : x; };
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            auto q = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + h * hs + d]; };
            auto k = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + C + h * hs + d]; };
            auto v = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + 2 * C + h * hs + d]; };
            auto g = [&](int t, int d) { return (double)dy[((size_t)b * T + t) * C + h * hs + d]; };
            for (int i = 0; i < T; i++) {
                size_t row = ((size_t)b * NH + h) * T + i;
                std::vector<double> s(i + 1), p(i + 1), dp(i + 1);
                double mx = -1e300;
                for (int j = 0; j <= i; j++) {
                    double a = 0;
                    for (int d = 0; d < hs; d++) a += q(i, d) * k(j, d);
                    s[j] = a * scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j <= i; j++) sum += std::exp(s[j] - mx);
                double l = lse_in ? (double)lse_in[row] : mx + std::log(sum);
                lse[row] = l;
                for (int j = 0; j <= i; j++) p[j] = std::exp(s[j] - l);
                double D = 0;
                for (int j = 0; j <= i; j++) {
                    double a = 0;
                    for (int d = 0; d < hs; d++) a += g(i, d) * v(j, d);
                    dp[j] = a;
                    D += p[j] * a;
                }
                if (d_in) D = d_in[row];
                for (int d = 0; d < hs; d++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++) o += p[j] * v(j, d);
                    y[((size_t)b * T + i) * C + h * hs + d] = o;
                }
                for (int j = 0; j <= i; j++) {
                    double ds = rb(p[j] * (dp[j] - D));
                    double pj = rb(p[j]);
                    for (int d = 0; d < hs; d++) {
                        dqkv[((size_t)b * T + i) * 3 * C + h * hs + d] += ds * k(j, d) * scale;
                        dqkv[((size_t)b * T + j) * 3 * C + C + h * hs + d] += ds * q(i, d) * scale;
                        dqkv[((size_t)b * T + j) * 3 * C + 2 * C + h * hs + d] += pj * g(i, d);
                    }
                }
            }
        }
}

// The fp32 forward and backward kernels: y, lse, dvec, dqkv.
static void run_f32(const Case& cs, const std::vector<float>& qkv, const std::vector<float>& dy,
                    std::vector<float>& y, std::vector<float>& lse, std::vector<float>& dqkv) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    y.assign(dy.size(), NAN);
    lse.assign((size_t)B * NH * T, NAN);
    std::vector<float> dvec(lse.size(), NAN);
    dqkv.assign(qkv.size(), NAN);
    unsigned nq = (T + cs.br - 1) / cs.br, nt = (T + cs.bt - 1) / cs.bt, rows = B * NH * T;
    emulate({nq, (unsigned)NH, (unsigned)B}, 256, [&] {
        flash_attn_fwd_f32(qkv.data(), y.data(), lse.data(), T, C, NH, cs.br, cs.bc, scale);
    });
    emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
        flash_attn_bwd_dot(y.data(), dy.data(), dvec.data(), B, T, C, NH);
    });
    emulate({nt, (unsigned)NH, (unsigned)B}, 256, [&] {
        flash_attn_bwd_dkdv_f32(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), T, C, NH, cs.bt, scale);
    });
    emulate({nt, (unsigned)NH, (unsigned)B}, 256, [&] {
        flash_attn_bwd_dq_f32(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), T, C, NH, cs.bt, scale);
    });
}

// The bf16 forward, the dot kernel and the bf16 backward kernels: y, lse, dvec, dqkv.
static void run_bf16(const Case& cs, const std::vector<float>& qkv, const std::vector<float>& dy,
                     std::vector<float>& y, std::vector<float>& lse, std::vector<float>& dvec,
                     std::vector<float>& dqkv) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    y.assign(dy.size(), NAN);
    lse.assign((size_t)B * NH * T, NAN);
    dvec.assign(lse.size(), NAN);
    dqkv.assign(qkv.size(), NAN);
    unsigned tiles = (T + 63) / 64, rows = B * NH * T;
    emulate(fwd_grid(cs), FB_THREADS, [&] {
        flash_attn_fwd_bf16(qkv.data(), y.data(), lse.data(), T, C, NH, scale);
    });
    emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
        flash_attn_bwd_dot(y.data(), dy.data(), dvec.data(), B, T, C, NH);
    });
    emulate({tiles, (unsigned)NH, (unsigned)B}, 128, [&] {
        flash_attn_bwd_dkdv_bf16(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), nullptr, T, C, NH, scale);
    });
    emulate(dq_grid(cs), FBB_DQ_THREADS, [&] {
        flash_attn_bwd_dq_bf16(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), nullptr, T, C, NH, scale);
    });
}

// The bf16 backward kernels writing dqkv in bf16 (the engine's bf16 mode): the fp32 output
// of run_bf16 rounded to nearest even, bit for bit. Returns whether it is.
static bool bf16_output_matches(const Case& cs, const std::vector<float>& qkv,
                                const std::vector<float>& dy, std::vector<float>& lse,
                                std::vector<float>& dvec, const std::vector<float>& dqkv) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    unsigned tiles = (T + 63) / 64;
    std::vector<unsigned short> out(qkv.size(), 0xffff);
    emulate({tiles, (unsigned)NH, (unsigned)B}, 128, [&] {
        flash_attn_bwd_dkdv_bf16(qkv.data(), dy.data(), lse.data(), dvec.data(), nullptr, out.data(), T, C, NH, scale);
    });
    emulate(dq_grid(cs), FBB_DQ_THREADS, [&] {
        flash_attn_bwd_dq_bf16(qkv.data(), dy.data(), lse.data(), dvec.data(), nullptr, out.data(), T, C, NH, scale);
    });
    for (size_t i = 0; i < out.size(); i++)
        if (out[i] != fa_f2bf(dqkv[i])) return false;
    return true;
}

// The bf16-storage ("io") kernels against the fp32-storage bf16 kernels, bit for bit, on
// inputs that already hold bf16 values (qkv and dy rounded): flash_attn_fwd_bf16_io's y is
// flash_attn_fwd_bf16's y rounded and its lse the same; flash_attn_bwd_dot_bf16 is
// flash_attn_bwd_dot on the widened values; the io backward's dqkv is the fp32-storage
// backward's bf16 output given the same lse and D. Returns "" or what differs.
static std::string io_mismatch(const Case& cs, const std::vector<float>& qkv,
                               const std::vector<float>& dy) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    unsigned tiles = (T + 63) / 64, rows = B * NH * T;
    std::vector<unsigned short> qkv_b(qkv.size()), dy_b(dy.size());
    std::vector<float> qkv_w(qkv.size()), dy_w(dy.size());
    for (size_t i = 0; i < qkv.size(); i++) qkv_w[i] = bf2f(qkv_b[i] = fa_f2bf(qkv[i]));
    for (size_t i = 0; i < dy.size(); i++) dy_w[i] = bf2f(dy_b[i] = fa_f2bf(dy[i]));
    auto finite = [](const std::vector<float>& v) {
        for (float x : v)
            if (!std::isfinite(x)) return false;
        return true;
    };
    auto bits = [](float x) {
        unsigned u;
        std::memcpy(&u, &x, 4);
        return u;
    };
    auto differing_bits = [&](const std::vector<float>& a, const std::vector<float>& b) {
        size_t n = 0;
        for (size_t i = 0; i < a.size(); i++) n += bits(a[i]) != bits(b[i]);
        return n;
    };
    std::string why;
    auto note = [&](const char* what, size_t n, size_t of) {
        if (n) why += std::string(why.empty() ? "" : ", ") + what + " " + std::to_string(n) +
                      "/" + std::to_string(of) + " differ";
    };

    // Forward: bf16 storage, and fp32 storage on the widened bf16 qkv.
    std::vector<unsigned short> y_b(dy.size(), 0xffff);
    std::vector<float> lse_b((size_t)B * NH * T, NAN), y(dy.size(), NAN), lse(lse_b.size(), NAN);
    emulate(fwd_grid(cs), FB_THREADS, [&] {
        flash_attn_fwd_bf16_io(qkv_b.data(), y_b.data(), lse_b.data(), T, C, NH, scale);
    });
    emulate(fwd_grid(cs), FB_THREADS, [&] {
        flash_attn_fwd_bf16(qkv_w.data(), y.data(), lse.data(), T, C, NH, scale);
    });
    if (!finite(lse_b) || !finite(y)) why = "forward left values unwritten or not finite";
    note("lse", differing_bits(lse_b, lse), lse.size());
    size_t ny = 0;
    for (size_t i = 0; i < y.size(); i++) ny += y_b[i] != fa_f2bf(y[i]);
    note("y", ny, y.size());

    // D: bf16 y and dy, against the fp32 kernel on the same values widened.
    std::vector<float> y_w(y_b.size()), dvec_b(lse.size(), NAN), dvec(lse.size(), NAN);
    for (size_t i = 0; i < y_b.size(); i++) y_w[i] = bf2f(y_b[i]);
    emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
        flash_attn_bwd_dot_bf16(y_b.data(), dy_b.data(), dvec_b.data(), B, T, C, NH);
    });
    emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
        flash_attn_bwd_dot(y_w.data(), dy_w.data(), dvec.data(), B, T, C, NH);
    });
    if (!finite(dvec_b)) why += std::string(why.empty() ? "" : ", ") + "D not finite";
    note("D", differing_bits(dvec_b, dvec), dvec.size());

    // Backward: the io kernels, and the fp32-storage ones writing bf16, on the same values
    // and the same lse and D. Different fills: an element neither writes still differs.
    std::vector<unsigned short> dqkv_b(qkv.size(), 0xffff), dqkv_ref(qkv.size(), 0xfffe);
    emulate({tiles, (unsigned)NH, (unsigned)B}, 128, [&] {
        flash_attn_bwd_dkdv_bf16_io(qkv_b.data(), dy_b.data(), lse_b.data(), dvec_b.data(), dqkv_b.data(), T, C, NH, scale);
    });
    emulate(dq_grid(cs), FBB_DQ_THREADS, [&] {
        flash_attn_bwd_dq_bf16_io(qkv_b.data(), dy_b.data(), lse_b.data(), dvec_b.data(), dqkv_b.data(), T, C, NH, scale);
    });
    emulate({tiles, (unsigned)NH, (unsigned)B}, 128, [&] {
        flash_attn_bwd_dkdv_bf16(qkv_w.data(), dy_w.data(), lse_b.data(), dvec_b.data(), nullptr, dqkv_ref.data(), T, C, NH, scale);
    });
    emulate(dq_grid(cs), FBB_DQ_THREADS, [&] {
        flash_attn_bwd_dq_bf16(qkv_w.data(), dy_w.data(), lse_b.data(), dvec_b.data(), nullptr, dqkv_ref.data(), T, C, NH, scale);
    });
    const char* names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        auto got = third(dqkv_b, C, part), want = third(dqkv_ref, C, part);
        size_t n = 0;
        for (size_t i = 0; i < got.size(); i++) n += got[i] != want[i];
        note(names[part], n, got.size());
    }
    return why;
}

// The head-size-64 kernels (_hs64: arrays, loops and guards fixed at compile time) against
// the generic ones, bit for bit (the same arithmetic in the same order): forward, and
// backward with fp32 and bf16 output, in both storages. Returns "" or what differs.
static std::string hs64_mismatch(const Case& cs, const std::vector<float>& qkv,
                                 const std::vector<float>& dy) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    unsigned tiles = (T + 63) / 64, rows = B * NH * T;
    dim3 grid{tiles, (unsigned)NH, (unsigned)B};
    std::string why;
    auto same = [&](const char* what, const void* a, const void* b, size_t bytes) {
        if (std::memcmp(a, b, bytes) != 0)
            why += std::string(why.empty() ? "" : ", ") + what + " differs";
    };
    // fp32 storage.
    std::vector<float> y(dy.size(), NAN), y64(dy.size(), NAN), lse((size_t)rows, NAN),
        lse64(lse.size(), NAN), dvec(lse.size(), NAN);
    emulate(fwd_grid(cs), FB_THREADS, [&] { flash_attn_fwd_bf16(qkv.data(), y.data(), lse.data(), T, C, NH, scale); });
    emulate(fwd_grid(cs), FB_THREADS, [&] { flash_attn_fwd_bf16_hs64(qkv.data(), y64.data(), lse64.data(), T, C, NH, scale); });
    same("y", y.data(), y64.data(), 4 * y.size());
    same("lse", lse.data(), lse64.data(), 4 * lse.size());
    emulate({(rows + 7) / 8, 1, 1}, 256, [&] { flash_attn_bwd_dot(y.data(), dy.data(), dvec.data(), B, T, C, NH); });
    std::vector<float> g(qkv.size(), NAN), g64(qkv.size(), 1.0f);
    std::vector<unsigned short> gb(qkv.size(), 0xffff), gb64(qkv.size(), 0xfffe);
    auto bwd = [&](auto dkdv, auto dq, float* out, unsigned short* outb) {
        emulate(grid, 128, [&] { dkdv(qkv.data(), dy.data(), lse.data(), dvec.data(), out, outb, T, C, NH, scale); });
        emulate(dq_grid(cs), FBB_DQ_THREADS, [&] { dq(qkv.data(), dy.data(), lse.data(), dvec.data(), out, outb, T, C, NH, scale); });
    };
    bwd(flash_attn_bwd_dkdv_bf16, flash_attn_bwd_dq_bf16, g.data(), nullptr);
    bwd(flash_attn_bwd_dkdv_bf16_hs64, flash_attn_bwd_dq_bf16_hs64, g64.data(), nullptr);
    same("dqkv", g.data(), g64.data(), 4 * g.size());
    bwd(flash_attn_bwd_dkdv_bf16, flash_attn_bwd_dq_bf16, nullptr, gb.data());
    bwd(flash_attn_bwd_dkdv_bf16_hs64, flash_attn_bwd_dq_bf16_hs64, nullptr, gb64.data());
    same("dqkv (bf16 output)", gb.data(), gb64.data(), 2 * gb.size());
    // bf16 storage.
    std::vector<unsigned short> qb(qkv.size()), dyb(dy.size()), yb(dy.size(), 0xffff),
        yb64(dy.size(), 0xfffe), ib(qkv.size(), 0xffff), ib64(qkv.size(), 0xfffe);
    for (size_t i = 0; i < qkv.size(); i++) qb[i] = fa_f2bf(qkv[i]);
    for (size_t i = 0; i < dy.size(); i++) dyb[i] = fa_f2bf(dy[i]);
    emulate(fwd_grid(cs), FB_THREADS, [&] { flash_attn_fwd_bf16_io(qb.data(), yb.data(), lse.data(), T, C, NH, scale); });
    emulate(fwd_grid(cs), FB_THREADS, [&] { flash_attn_fwd_bf16_io_hs64(qb.data(), yb64.data(), lse64.data(), T, C, NH, scale); });
    same("y (bf16 storage)", yb.data(), yb64.data(), 2 * yb.size());
    same("lse (bf16 storage)", lse.data(), lse64.data(), 4 * lse.size());
    bwd_io(cs, flash_attn_bwd_dkdv_bf16_io, flash_attn_bwd_dq_bf16_io, qb.data(), dyb.data(),
           lse.data(), dvec.data(), ib.data());
    bwd_io(cs, flash_attn_bwd_dkdv_bf16_io_hs64, flash_attn_bwd_dq_bf16_io_hs64, qb.data(),
           dyb.data(), lse.data(), dvec.data(), ib64.data());
    same("dqkv (bf16 storage)", ib.data(), ib64.data(), 2 * ib.size());
    return why;
}

// The bf16-storage kernels with synchronous tile loads (_io_sync: the flash_async switch
// off) against the cp.async ones, bit for bit (loads move data only): forward and
// backward, generic and (hs = 64) head-size-64 forms. Returns "" or what differs.
static std::string sync_mismatch(const Case& cs, const std::vector<float>& qkv,
                                 const std::vector<float>& dy) {
    int B = cs.B, T = cs.T, NH = cs.NH, C = NH * cs.hs;
    float scale = 1.0f / std::sqrt((float)cs.hs);
    unsigned rows = B * NH * T;
    std::vector<unsigned short> qb(qkv.size()), dyb(dy.size());
    for (size_t i = 0; i < qkv.size(); i++) qb[i] = fa_f2bf(qkv[i]);
    for (size_t i = 0; i < dy.size(); i++) dyb[i] = fa_f2bf(dy[i]);
    std::string why;
    // Different fills: an element one form leaves unwritten differs.
    auto check = [&](const char* form, auto fwd, auto dkdv, auto dq, auto fwd_sync,
                     auto dkdv_sync, auto dq_sync) {
        std::vector<unsigned short> y(dy.size(), 0xffff), ys(dy.size(), 0xfffe),
            g(qkv.size(), 0xffff), gs(qkv.size(), 0xfffe);
        std::vector<float> lse((size_t)rows, NAN), lses(lse.size(), 1.0f), dvec(lse.size());
        emulate(fwd_grid(cs), FB_THREADS, [&] { fwd(qb.data(), y.data(), lse.data(), T, C, NH, scale); });
        emulate(fwd_grid(cs), FB_THREADS, [&] { fwd_sync(qb.data(), ys.data(), lses.data(), T, C, NH, scale); });
        emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
            flash_attn_bwd_dot_bf16(y.data(), dyb.data(), dvec.data(), B, T, C, NH);
        });
        bwd_io(cs, dkdv, dq, qb.data(), dyb.data(), lse.data(), dvec.data(), g.data());
        bwd_io(cs, dkdv_sync, dq_sync, qb.data(), dyb.data(), lse.data(), dvec.data(), gs.data());
        bool same = y == ys && g == gs && std::memcmp(lse.data(), lses.data(), 4 * lse.size()) == 0;
        if (!same) why += std::string(why.empty() ? "" : ", ") + form + " differ";
    };
    check("generic kernels", flash_attn_fwd_bf16_io, flash_attn_bwd_dkdv_bf16_io,
          flash_attn_bwd_dq_bf16_io, flash_attn_fwd_bf16_io_sync,
          flash_attn_bwd_dkdv_bf16_io_sync, flash_attn_bwd_dq_bf16_io_sync);
    if (cs.hs == 64)
        check("head-size-64 kernels", flash_attn_fwd_bf16_io_hs64,
              flash_attn_bwd_dkdv_bf16_io_hs64, flash_attn_bwd_dq_bf16_io_hs64,
              flash_attn_fwd_bf16_io_sync_hs64, flash_attn_bwd_dkdv_bf16_io_sync_hs64,
              flash_attn_bwd_dq_bf16_io_sync_hs64);
    return why;
}

int main(int argc, char** argv) {
    // fp32 cases (tile sizes as given) and, where hs is a multiple of 16, the bf16 kernels.
    // `main quick` runs the smaller list (the bf16 backward's shapes, for the cargo test).
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    std::vector<Case> quick_cases = {
        {2, 1, 2, 16, 32, 32, 32}, {2, 33, 3, 32, 32, 32, 32}, {2, 70, 2, 128, 32, 16, 16},
        {2, 97, 2, 64, 32, 32, 32}, {1, 70, 2, 80, 32, 32, 16},
    };
    std::vector<Case> cases = {
        {1, 1, 1, 16, 32, 32, 32}, {2, 7, 2, 16, 32, 32, 32}, {1, 64, 2, 64, 32, 32, 32},
        {2, 100, 2, 64, 32, 16, 16}, {1, 100, 1, 128, 32, 16, 16}, {1, 37, 3, 24, 16, 8, 8},
        {1, 70, 1, 40, 32, 32, 16}, {1, 150, 2, 32, 32, 32, 32},
        // bf16 backward coverage: B = 2, T < 64, = 64, not a multiple of 32 or 64, > 128.
        {2, 1, 2, 16, 32, 32, 32}, {2, 33, 3, 32, 32, 32, 32}, {2, 64, 2, 128, 32, 16, 16},
        {2, 97, 3, 64, 32, 32, 32}, {2, 130, 2, 16, 32, 32, 32}, {2, 150, 2, 128, 32, 16, 16},
        {2, 45, 2, 64, 32, 32, 32}, {2, 200, 2, 32, 32, 32, 32},
        // The other head sizes the bf16 kernels take (multiples of 16 up to 128), with the
        // fp32 tiles src/engine/cuda/flash.rs picks for them: T below, across and past the
        // 64-row bf16 tiles.
        {2, 45, 2, 48, 32, 32, 32}, {1, 70, 2, 80, 32, 32, 16}, {2, 33, 1, 96, 32, 32, 16},
        {1, 97, 1, 112, 32, 32, 16},
    };
    if (quick) cases = quick_cases;
    const double TOL_F32 = 1e-4, TOL_BF16 = 2e-2, TOL_BF16_MODEL = 2e-3;
    int failures = 0;
    double worst_exact = 0, worst_l2 = 0, worst_f32 = 0, worst_model = 0;
    std::mt19937_64 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto cs : cases) {
        int B = cs.B, T = cs.T, NH = cs.NH, hs = cs.hs, C = NH * hs;
        std::vector<float> qkv((size_t)B * T * 3 * C), dy((size_t)B * T * C);
        for (auto& v : qkv) v = nd(rng);
        for (auto& v : dy) v = nd(rng);
        std::vector<double> y_ref, lse_ref, dqkv_ref;
        reference(B, T, NH, hs, qkv, dy, nullptr, nullptr, false, y_ref, lse_ref, dqkv_ref);
        std::vector<float> y, lse, dqkv;
        run_f32(cs, qkv, dy, y, lse, dqkv);
        double ey = rel(y, y_ref), el = rel(lse, lse_ref), eg = rel(dqkv, dqkv_ref);
        bool ok = ey < TOL_F32 && el < TOL_F32 && eg < TOL_F32;  // NaN fails
        std::printf("%s B=%d T=%d NH=%d hs=%d br=%d bc=%d bt=%d: y %.2e lse %.2e dqkv %.2e\n",
                    ok ? "ok  " : "FAIL", B, T, NH, hs, cs.br, cs.bc, cs.bt, ey, el, eg);
        failures += !ok;
        if (hs % 16) continue;

        std::vector<float> y16, lse16, dvec16, dqkv16;
        run_bf16(cs, qkv, dy, y16, lse16, dvec16, dqkv16);
        bool okb16 = bf16_output_matches(cs, qkv, dy, lse16, dvec16, dqkv16);
        std::printf("%s   bf16 backward, bf16 output: %s\n", okb16 ? "ok  " : "FAIL",
                    okb16 ? "the fp32 output rounded, bit for bit" : "differs from the fp32 output rounded");
        failures += !okb16;
        std::string io = io_mismatch(cs, qkv, dy);
        std::printf("%s   bf16 storage (io kernels): %s\n", io.empty() ? "ok  " : "FAIL",
                    io.empty() ? "y, lse, D and dqkv those of the fp32-storage kernels, bit "
                                 "for bit"
                               : io.c_str());
        failures += !io.empty();
        std::string sync = sync_mismatch(cs, qkv, dy);
        std::printf("%s   synchronous tile loads (io_sync kernels): %s\n",
                    sync.empty() ? "ok  " : "FAIL",
                    sync.empty() ? "the cp.async kernels' outputs, bit for bit" : sync.c_str());
        failures += !sync.empty();
        if (hs == 64) {
            std::string h64 = hs64_mismatch(cs, qkv, dy);
            std::printf("%s   head-size-64 kernels: %s\n", h64.empty() ? "ok  " : "FAIL",
                        h64.empty() ? "the generic kernels' outputs, bit for bit" : h64.c_str());
            failures += !h64.empty();
        }
        double ey16 = rel(y16, y_ref), el16 = rel(lse16, lse_ref);
        bool okf = ey16 < TOL_BF16 && el16 < TOL_BF16;
        std::printf("%s   bf16 forward: y %.2e lse %.2e\n", okf ? "ok  " : "FAIL", ey16, el16);
        failures += !okf;
        // The kernels' own rounding, modelled in float64 (see the top of this file).
        std::vector<float> qkv_b(qkv), dy_b(dy);
        for (auto& v : qkv_b) v = round_bf16(v);
        for (auto& v : dy_b) v = round_bf16(v);
        std::vector<double> ym, lsem, dqkv_model;
        reference(B, T, NH, hs, qkv_b, dy_b, lse16.data(), dvec16.data(), true, ym, lsem,
                  dqkv_model);
        // At T = 1, dq and dk are exactly 0 (dS = P (dP - D) = 0): bf16 leaves them at
        // rounding noise (D = dy . y and dP = dy . v round differently), which is no error
        // of the kernels, so at T = 1 errors are relative to the largest of dq, dk, dv.
        double max_all = 0, l2_all = 0;
        for (double v : dqkv_ref) {
            max_all = std::max(max_all, std::fabs(v));
            l2_all += v * v;
        }
        double floor_max = T == 1 ? max_all : 1e-30;
        double floor_l2 = T == 1 ? std::sqrt(l2_all / 3) : 0.0;
        const char* names[3] = {"dq", "dk", "dv"};
        for (int part = 0; part < 3; part++) {
            auto got = third(dqkv16, C, part);
            double e = rel(got, third(dqkv_ref, C, part), floor_max);
            double e2 = rel_l2(got, third(dqkv_ref, C, part), floor_l2);
            double ef = rel(got, widen(third(dqkv, C, part)), floor_max);
            double em = rel(got, third(dqkv_model, C, part), floor_max);
            bool okb = e < TOL_BF16 && e2 < TOL_BF16 && ef < TOL_BF16 && em < TOL_BF16_MODEL;
            std::printf("%s   bf16 backward %s: vs float64 max %.2e L2 %.2e, vs fp32 kernels "
                        "%.2e, vs bf16-rounding model %.2e\n",
                        okb ? "ok  " : "FAIL", names[part], e, e2, ef, em);
            failures += !okb;
            worst_exact = std::max(worst_exact, e);
            worst_l2 = std::max(worst_l2, e2);
            worst_f32 = std::max(worst_f32, ef);
            worst_model = std::max(worst_model, em);
        }
    }
    std::printf("bf16 backward worst: vs float64 max %.2e (bound %.0e), L2 %.2e (bound %.0e); "
                "vs fp32 kernels %.2e (bound %.0e); vs bf16-rounding model %.2e (bound %.0e)\n",
                worst_exact, TOL_BF16, worst_l2, TOL_BF16, worst_f32, TOL_BF16, worst_model,
                TOL_BF16_MODEL);
    std::printf("%s\n", failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
