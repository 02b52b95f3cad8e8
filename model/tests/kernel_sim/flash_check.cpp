// flash.cu's kernels (transformed by kernel_sim.rs into flash_sim.cu) against attention in
// double precision: out, dq, dkv, dk_pe for random inputs. Head dims come as -DHEADS= -DNOPE=
// -DROPE= -DDV=; argv: batch, sequence length.
#include "warp.h"
#include "flash_sim.cu"
#include <random>

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    const int B = atoi(argv[1]), T = atoi(argv[2]), H = HEADS;
    const int dqk = NOPE + ROPE, qw = H * dqk, kvw = H * (NOPE + DV), ow = H * DV, n = B * T;
    const float scale = 1.0f / std::sqrt((float)dqk);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> q(n * qw), kv(n * kvw), kpe(n * ROPE), dout(n * ow);
    for (auto* v : {&q, &kv, &kpe, &dout})
        for (auto& x : *v) x = normal(rng);

    // The reference: softmax(scale · Q Kᵀ) V over keys ≤ query, and its gradients.
    std::vector<double> o(n * ow, 0), dq(n * qw, 0), dkv(n * kvw, 0), dkpe(n * ROPE, 0);
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            auto K = [&](int t, int c) -> double {
                return c < NOPE ? kv[(b * T + t) * kvw + h * (NOPE + DV) + c] : kpe[(b * T + t) * ROPE + c - NOPE];
            };
            auto V = [&](int t, int c) -> double { return kv[(b * T + t) * kvw + h * (NOPE + DV) + NOPE + c]; };
            auto Q = [&](int t, int c) -> double { return q[(b * T + t) * qw + h * dqk + c]; };
            auto dO = [&](int t, int c) -> double { return dout[(b * T + t) * ow + h * DV + c]; };
            for (int i = 0; i < T; ++i) {
                std::vector<double> p(i + 1), dp(i + 1);
                double m = -1e300, l = 0, D = 0;
                for (int j = 0; j <= i; ++j) {
                    double s = 0;
                    for (int c = 0; c < dqk; ++c) s += Q(i, c) * K(j, c);
                    p[j] = s * scale;
                    m = std::max(m, p[j]);
                }
                for (auto& x : p) l += (x = std::exp(x - m));
                for (auto& x : p) x /= l;
                for (int c = 0; c < DV; ++c) {
                    double acc = 0;
                    for (int j = 0; j <= i; ++j) acc += p[j] * V(j, c);
                    o[(b * T + i) * ow + h * DV + c] = acc;
                    D += acc * dO(i, c);
                }
                for (int j = 0; j <= i; ++j) {
                    double s = 0;
                    for (int c = 0; c < DV; ++c) s += dO(i, c) * V(j, c);
                    dp[j] = s;
                }
                for (int j = 0; j <= i; ++j) {
                    double ds = p[j] * (dp[j] - D) * scale;
                    for (int c = 0; c < DV; ++c) dkv[(b * T + j) * kvw + h * (NOPE + DV) + NOPE + c] += p[j] * dO(i, c);
                    for (int c = 0; c < dqk; ++c) {
                        dq[(b * T + i) * qw + h * dqk + c] += ds * K(j, c);
                        double gk = ds * Q(i, c);
                        if (c < NOPE)
                            dkv[(b * T + j) * kvw + h * (NOPE + DV) + c] += gk;
                        else
                            dkpe[(b * T + j) * ROPE + c - NOPE] += gk;
                    }
                }
            }
        }
    }

    // The kernels, launched as flash.rs launches them.
    const int nq = (T + 63) / 64, TP = nq * 64, dqkp = (dqk + 15) / 16 * 16, dvp = (DV + 15) / 16 * 16;
    const float sl2 = scale * 1.4426950408889634f;
    auto pack = [&](const float* src, const float* src2, int stride, int hs, int off, int width, int split, int dp) {
        std::vector<unsigned short> d((size_t)B * H * TP * dp, 0xffff);
        long long pairs = (long long)B * H * TP * dp / 2;
        launch((int)((pairs + 255) / 256), 1, 256,
               [&] { flash_pack(d.data(), src, src2, stride, hs, off, width, split, dp, B, T, TP); });
        return d;
    };
    auto qp = pack(q.data(), q.data(), qw, dqk, 0, dqk, dqk, dqkp);
    auto kp = pack(kv.data(), kpe.data(), kvw, NOPE + DV, 0, dqk, NOPE, dqkp);
    auto vp = pack(kv.data(), kv.data(), kvw, NOPE + DV, NOPE, DV, DV, dvp);
    auto dop = pack(dout.data(), dout.data(), ow, DV, 0, DV, DV, dvp);
    std::vector<float> go(n * ow, NAN), lse(B * H * T, NAN), delta(B * H * T, NAN), dk(B * H * T * dqk, NAN),
        gdkv(n * kvw, NAN), gdq(n * qw, NAN), gdkpe(n * ROPE, 0);
    launch(B * H, nq, 128, [&] { flash_fwd(qp.data(), kp.data(), vp.data(), go.data(), lse.data(), B, T, TP, sl2); });
    launch((B * H * T * 32 + 255) / 256, 1, 256, [&] { flash_bwd_delta(go.data(), dout.data(), delta.data(), B, T); });
    launch(B * H, nq, 128, [&] {
        flash_bwd_kv(qp.data(), kp.data(), vp.data(), dop.data(), lse.data(), delta.data(), dk.data(), gdkv.data(), B,
                     T, TP, scale, sl2);
    });
    launch(B * H, nq, 128, [&] {
        flash_bwd_q(qp.data(), kp.data(), vp.data(), dop.data(), lse.data(), delta.data(), gdq.data(), B, T, TP, scale,
                    sl2);
    });
    // What attention.rs' keys_grad_from_heads does with dk.
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int t = 0; t < T; ++t)
                for (int c = 0; c < dqk; ++c) {
                    float v = dk[((b * H + h) * T + t) * dqk + c];
                    if (c < NOPE)
                        gdkv[(b * T + t) * kvw + h * (NOPE + DV) + c] = v;
                    else
                        gdkpe[(b * T + t) * ROPE + c - NOPE] += v;
                }
    report("out", go, o);
    report("dq", gdq, dq);
    report("dkv", gdkv, dkv);
    report("dk_pe", gdkpe, dkpe);
}
