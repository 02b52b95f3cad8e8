// gemm.cu's grouped_gemm_bf16 (transformed by kernel_sim.rs into gemm_sim.cu) against a
// double-precision product: one launch over problems with every transpose, sizes that end
// inside a tile, padded leading dimensions, an empty problem, and accumulation.
#include "warp.h"
#include "gemm_sim.cu"
#include <random>

int main() {
    std::mt19937 rng(2);
    std::normal_distribution<float> normal(0, 1);
    struct Spec {
        int m, n, k, at, bt;
    };
    // The kernel reads float4s along each matrix's contiguous direction (k for A, n for B, or
    // m and k when transposed), so those extents are multiples of 4 (grouped.rs checks); the
    // others end inside a tile.
    const std::vector<Spec> specs = {{130, 72, 44, 0, 0}, {64, 200, 33, 1, 0}, {0, 16, 8, 0, 0},
                                     {5, 132, 100, 0, 1}, {140, 40, 68, 1, 1}, {200, 136, 300, 1, 0}};
    std::vector<GemmProblem> ps;
    std::vector<std::vector<float>> A(specs.size()), B(specs.size()), C(specs.size());
    std::vector<std::vector<double>> R(specs.size());
    int tiles = 0;
    for (size_t i = 0; i < specs.size(); ++i) {
        Spec s = specs[i];
        long long lda = (s.at ? s.m : s.k) + 4, ldb = (s.bt ? s.k : s.n) + 8, ldc = s.n + 2;
        A[i].resize((s.at ? s.k : s.m) * lda);
        B[i].resize((s.bt ? s.n : s.k) * ldb);
        C[i].resize(s.m * ldc);
        for (auto* v : {&A[i], &B[i], &C[i]})
            for (auto& x : *v) x = normal(rng);
        R[i].assign(C[i].begin(), C[i].end());
        for (int r = 0; r < s.m; ++r)
            for (int c = 0; c < s.n; ++c) {
                double acc = 0;
                for (int k = 0; k < s.k; ++k)
                    acc += (double)(s.at ? A[i][k * lda + r] : A[i][r * lda + k]) *
                           (s.bt ? B[i][c * ldb + k] : B[i][k * ldb + c]);
                R[i][r * ldc + c] += acc;
            }
        if (s.m == 0) continue;  // grouped.rs leaves empty problems out
        ps.push_back({A[i].data(), B[i].data(), C[i].data(), lda, ldb, ldc, s.m, s.n, s.k, s.at, s.bt, tiles});
        tiles += ((s.m + 127) / 128) * ((s.n + 127) / 128);
    }
    launch(tiles, 1, 256, [&] { grouped_gemm_bf16(ps.data(), (int)ps.size(), 1); });
    for (size_t i = 0; i < specs.size(); ++i) {
        char name[32];
        snprintf(name, sizeof name, "problem%zu", i);
        report(name, C[i], R[i]);
    }
}
