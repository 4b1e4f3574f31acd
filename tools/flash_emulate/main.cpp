// main.cpp: checks the fp32 kernels of kernels/flash_attention.cu on the CPU (see shim.h)
// against a float64 causal attention, forward and backward, for several shapes and tile
// sizes. Build and run with tools/flash_emulate/run.sh; prints one line per case and exits
// non-zero when an error exceeds 1e-4 relative to the tensor's largest magnitude.
#include "shim.h"
#include "../../kernels/flash_attention.cu"
#include <cstdio>
#include <random>

struct Case { int B, T, NH, hs, br, bc, bt; };

static double rel(const std::vector<float>& got, const std::vector<double>& want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); i++) {
        num = std::max(num, std::fabs(got[i] - want[i]));
        den = std::max(den, std::fabs(want[i]));
    }
    return num / std::max(den, 1e-30);
}

int main() {
    std::vector<Case> cases = {
        {1, 1, 1, 16, 32, 32, 32}, {2, 7, 2, 16, 32, 32, 32}, {1, 64, 2, 64, 32, 32, 32},
        {2, 100, 2, 64, 32, 16, 16}, {1, 100, 1, 128, 32, 16, 16}, {1, 37, 3, 24, 16, 8, 8},
        {1, 70, 1, 40, 32, 32, 16}, {1, 150, 2, 32, 32, 32, 32},
    };
    int failures = 0;
    std::mt19937_64 rng(7);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto cs : cases) {
        int B = cs.B, T = cs.T, NH = cs.NH, hs = cs.hs, C = NH * hs;
        float scale = 1.0f / std::sqrt((float)hs);
        std::vector<float> qkv((size_t)B * T * 3 * C), dy((size_t)B * T * C);
        for (auto& v : qkv) v = nd(rng);
        for (auto& v : dy) v = nd(rng);
        // float64 reference
        std::vector<double> y_ref(dy.size()), lse_ref((size_t)B * NH * T), dqkv_ref(qkv.size());
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                auto q = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + h * hs + d]; };
                auto k = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + C + h * hs + d]; };
                auto v = [&](int t, int d) { return (double)qkv[((size_t)b * T + t) * 3 * C + 2 * C + h * hs + d]; };
                auto g = [&](int t, int d) { return (double)dy[((size_t)b * T + t) * C + h * hs + d]; };
                for (int i = 0; i < T; i++) {
                    std::vector<double> s(i + 1), p(i + 1), dp(i + 1);
                    double mx = -1e300;
                    for (int j = 0; j <= i; j++) {
                        double a = 0;
                        for (int d = 0; d < hs; d++) a += q(i, d) * k(j, d);
                        s[j] = a / std::sqrt((double)hs);
                        mx = std::max(mx, s[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= i; j++) sum += std::exp(s[j] - mx);
                    lse_ref[((size_t)b * NH + h) * T + i] = mx + std::log(sum);
                    for (int j = 0; j <= i; j++) p[j] = std::exp(s[j] - mx) / sum;
                    double D = 0;
                    for (int j = 0; j <= i; j++) {
                        double a = 0;
                        for (int d = 0; d < hs; d++) a += g(i, d) * v(j, d);
                        dp[j] = a;
                        D += p[j] * a;
                    }
                    for (int d = 0; d < hs; d++) {
                        double o = 0;
                        for (int j = 0; j <= i; j++) o += p[j] * v(j, d);
                        y_ref[((size_t)b * T + i) * C + h * hs + d] = o;
                    }
                    for (int j = 0; j <= i; j++) {
                        double ds = p[j] * (dp[j] - D) / std::sqrt((double)hs);
                        for (int d = 0; d < hs; d++) {
                            dqkv_ref[((size_t)b * T + i) * 3 * C + h * hs + d] += ds * k(j, d);
                            dqkv_ref[((size_t)b * T + j) * 3 * C + C + h * hs + d] += ds * q(i, d);
                            dqkv_ref[((size_t)b * T + j) * 3 * C + 2 * C + h * hs + d] += p[j] * g(i, d);
                        }
                    }
                }
            }
        std::vector<float> y(dy.size(), NAN), lse(lse_ref.size(), NAN), dvec(lse_ref.size(), NAN),
            dqkv(qkv.size(), NAN);
        unsigned nq = (T + cs.br - 1) / cs.br, nt = (T + cs.bt - 1) / cs.bt;
        emulate({nq, (unsigned)NH, (unsigned)B}, 256, [&] {
            flash_attn_fwd_f32(qkv.data(), y.data(), lse.data(), T, C, NH, cs.br, cs.bc, scale);
        });
        unsigned rows = B * NH * T;
        emulate({(rows + 7) / 8, 1, 1}, 256, [&] {
            flash_attn_bwd_dot(y.data(), dy.data(), dvec.data(), B, T, C, NH);
        });
        emulate({nt, (unsigned)NH, (unsigned)B}, 256, [&] {
            flash_attn_bwd_dkdv_f32(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), T, C, NH, cs.bt, scale);
        });
        emulate({nt, (unsigned)NH, (unsigned)B}, 256, [&] {
            flash_attn_bwd_dq_f32(qkv.data(), dy.data(), lse.data(), dvec.data(), dqkv.data(), T, C, NH, cs.bt, scale);
        });
        bool bf16 = hs % 16 == 0;
        double ey16 = 0, el16 = 0;
        if (bf16) {
            std::vector<float> y16(dy.size(), NAN), lse16(lse_ref.size(), NAN);
            emulate({(unsigned)(T + 63) / 64, (unsigned)NH, (unsigned)B}, 128, [&] {
                flash_attn_fwd_bf16(qkv.data(), y16.data(), lse16.data(), T, C, NH, scale);
            });
            ey16 = rel(y16, y_ref);
            el16 = rel(lse16, lse_ref);
        }
        double ey = rel(y, y_ref), el = rel(lse, lse_ref), eg = rel(dqkv, dqkv_ref);
        bool ok = ey < 1e-4 && el < 1e-4 && eg < 1e-4 && ey16 < 2e-2 && el16 < 2e-2;  // NaN fails
        if (bf16) std::printf("     bf16 forward: y %.2e lse %.2e\n", ey16, el16);
        failures += !ok;
        std::printf("%s B=%d T=%d NH=%d hs=%d br=%d bc=%d bt=%d: y %.2e lse %.2e dqkv %.2e\n",
                    ok ? "ok  " : "FAIL", B, T, NH, hs, cs.br, cs.bc, cs.bt, ey, el, eg);
    }
    return failures ? 1 : 0;
}
