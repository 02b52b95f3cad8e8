// The routed experts' grouped GEMM in bf16 on the tensor cores: one launch for every expert's
// problem of a projection, f32 in global memory, operands rounded to bf16 as they are staged in
// shared memory, f32 accumulation (mma.sync m16n8k16). cuBLAS 13.0's grouped GEMM takes f32
// operands only at TF32 (model/src/device/cuda/grouped.rs); this is its bf16 counterpart.
//
// Appended to kernels.cu and tensor_core.cuh by module.rs.

struct F2 {
    float x, y;
};

// One problem, row-major: C (m × n) (+)= op(A) (m × k) · op(B) (k × n). op(A) = A (m rows of
// lda) or, with a_trans, Aᵀ of A (k rows of lda); likewise B. `tile0` is the problem's first
// tile in the launch's numbering (tiles of GG_BM × GG_BN, row-major over C).
struct GemmProblem {
    const float* a;
    const float* b;
    float* c;
    long long lda, ldb, ldc;
    int m, n, k, a_trans, b_trans, tile0;
};

#define GG_BM 128
#define GG_BN 128
#define GG_BK 32
#define GG_LD (GG_BK + 8)  // shared rows padded by 8 bf16 (fragment loads in different banks)
#define GG_THREADS 256
// Pairs of k per thread per tile: (GG_BM × GG_BK / 2) / GG_THREADS for A, the same for B.
#define GG_PAIRS (GG_BM * GG_BK / 2 / GG_THREADS)

// The pairs (k, k+1) of one operand tile this thread stages: `rows` (m or n) × GG_BK, stored
// [row][k] in shared memory. `trans`: the matrix is stored k-major (element (row, k) at
// src[k·ld + row]), else row-major (src[row·ld + k]). Zero outside `nrows` × `nk`.
__device__ __forceinline__ void gg_fetch(F2* v, const float* src, long long ld, int trans, int row0, int nrows,
                                         int k0, int nk) {
#pragma unroll
    for (int i = 0; i < GG_PAIRS; ++i) {
        int item = threadIdx.x + i * GG_THREADS;
        // Consecutive threads walk the matrix's contiguous direction.
        int r, kp;
        if (trans) {
            r = item % GG_BM;
            kp = item / GG_BM;
        } else {
            kp = item % (GG_BK / 2);
            r = item / (GG_BK / 2);
        }
        int row = row0 + r, k = k0 + 2 * kp;
        float x = 0.0f, y = 0.0f;
        if (row < nrows) {
            if (trans) {
                if (k < nk) x = src[(long long)k * ld + row];
                if (k + 1 < nk) y = src[(long long)(k + 1) * ld + row];
            } else {
                const float* p = src + (long long)row * ld + k;
                if (k < nk) x = p[0];
                if (k + 1 < nk) y = p[1];
            }
        }
        v[i].x = x;
        v[i].y = y;
    }
}

__device__ __forceinline__ void gg_store(u16* tile, const F2* v, int trans) {
#pragma unroll
    for (int i = 0; i < GG_PAIRS; ++i) {
        int item = threadIdx.x + i * GG_THREADS;
        int r = trans ? item % GG_BM : item / (GG_BK / 2);
        int kp = trans ? item / GG_BM : item % (GG_BK / 2);
        *(u32*)(tile + r * GG_LD + 2 * kp) = pack2(v[i].x, v[i].y);
    }
}

// One block per output tile of GG_BM × GG_BN, 8 warps as 2 (rows) × 4 (columns), each warp
// 64 × 32. Grid: the total tile count of `count` problems (`problems` in device memory, in tile
// order). `accumulate`: C += (else C =).
extern "C" __global__ void __launch_bounds__(GG_THREADS)
    grouped_gemm_bf16(const GemmProblem* problems, int count, int accumulate) {
    __shared__ __align__(16) u16 as[2][GG_BM * GG_LD];
    __shared__ __align__(16) u16 bs[2][GG_BN * GG_LD];
    int tile = blockIdx.x, pi = 0;
    for (int lo = 0, hi = count - 1; lo <= hi;) {  // the last problem whose tile0 ≤ tile
        int mid = (lo + hi) / 2;
        if (problems[mid].tile0 <= tile) {
            pi = mid;
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    GemmProblem p = problems[pi];
    int tiles_n = (p.n + GG_BN - 1) / GG_BN;
    int m0 = (tile - p.tile0) / tiles_n * GG_BM, n0 = (tile - p.tile0) % tiles_n * GG_BN;
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int wm = (w >> 2) * 64, wn = (w & 3) * 32;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

    // op(A) rows are C's rows; op(B)ᵀ rows are C's columns (B is staged as [n][k]).
    int bt = !p.b_trans;
    F2 va[GG_PAIRS], vb[GG_PAIRS];
    gg_fetch(va, p.a, p.lda, p.a_trans, m0, p.m, 0, p.k);
    gg_fetch(vb, p.b, p.ldb, bt, n0, p.n, 0, p.k);
    gg_store(as[0], va, p.a_trans);
    gg_store(bs[0], vb, bt);
    __syncthreads();
    int steps = (p.k + GG_BK - 1) / GG_BK;
    for (int s = 0; s < steps; ++s) {
        int cur = s & 1;
        if (s + 1 < steps) {  // the next tile's loads are in flight while this one multiplies
            gg_fetch(va, p.a, p.lda, p.a_trans, m0, p.m, (s + 1) * GG_BK, p.k);
            gg_fetch(vb, p.b, p.ldb, bt, n0, p.n, (s + 1) * GG_BK, p.k);
        }
#pragma unroll
        for (int kk = 0; kk < GG_BK; kk += 16) {
            u32 af[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u16* r0 = as[cur] + (wm + 16 * i + g) * GG_LD + kk + 2 * t;
                const u16* r1 = r0 + 8 * GG_LD;
                af[i][0] = *(const u32*)r0;
                af[i][1] = *(const u32*)r1;
                af[i][2] = *(const u32*)(r0 + 8);
                af[i][3] = *(const u32*)(r1 + 8);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u16* br = bs[cur] + (wn + 8 * j + g) * GG_LD + kk + 2 * t;
                u32 b0 = *(const u32*)br, b1 = *(const u32*)(br + 8);
#pragma unroll
                for (int i = 0; i < 4; ++i) mma(acc[i][j], af[i], b0, b1);
            }
        }
        if (s + 1 < steps) {
            gg_store(as[cur ^ 1], va, p.a_trans);
            gg_store(bs[cur ^ 1], vb, bt);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = m0 + wm + 16 * i + g + 8 * h;
            if (row >= p.m) continue;
            float* crow = p.c + (long long)row * p.ldc;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int col = n0 + wn + 8 * j + 2 * t;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    if (col + e >= p.n) continue;
                    float v = acc[i][j][2 * h + e];
                    crow[col + e] = accumulate ? crow[col + e] + v : v;
                }
            }
        }
    }
}
