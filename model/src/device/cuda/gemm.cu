// The routed experts' grouped GEMM in bf16 on the tensor cores: one launch for every expert's
// problem of a projection, f32 in global memory, operands rounded to bf16 as they become MMA
// fragments, f32 accumulation (mma.sync m16n8k16). cuBLAS 13.0's grouped GEMM takes f32
// operands only at TF32 (model/src/device/cuda/grouped.rs); this is its bf16 counterpart.
//
// Tiles reach shared memory by cp.async, GG_STAGES − 1 of them in flight while the tensor cores
// work on another, in the layout each operand has in global memory (the direction contiguous
// there stays contiguous, so every copy is 16 bytes). The operands' contiguous extents and
// leading dimensions must be multiples of 4 floats and their addresses 16-byte aligned
// (grouped.rs checks; cuBLAS takes the rest).
//
// Appended to kernels.cu and tensor_core.cuh by module.rs.

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
#define GG_BK 16
#define GG_STAGES 4
#define GG_THREADS 256
// Shared rows in floats: a tile contiguous along k is [128][GG_LDK], one contiguous along m or n
// [GG_BK][GG_LDM]. The pads put the lanes of a fragment load in distinct banks (k-contiguous:
// a half-warp's float2 loads at rows g·24 + 2t; otherwise rows 2t·132 + g).
#define GG_LDK (GG_BK + 8)
#define GG_LDM (GG_BM + 4)
#define GG_TILE (GG_BM * GG_LDK)  // floats per operand per stage (≥ GG_BK × GG_LDM)
// Dynamic shared memory in bytes (grouped.rs sets the kernel's limit to it): 96 KiB.
#define GG_SMEM (2 * GG_STAGES * GG_TILE * 4)
// 16-byte copies per thread per operand tile.
#define GG_CHUNKS (GG_BM * GG_BK / 4 / GG_THREADS)

// Starts the copy of one operand tile, at `r0` along m (or n) and `k0` along k, into `tile`:
// `src` holds element (r, k) at src[r·ld + k] when `kc` (contiguous along k), else at
// src[k·ld + r]. Chunks outside `nr` × `nk` are zero-filled.
__device__ __forceinline__ void gg_load(float* tile, const float* src, long long ld, int kc, int r0, int nr, int k0,
                                        int nk) {
#pragma unroll
    for (int i = 0; i < GG_CHUNKS; ++i) {
        int item = threadIdx.x + i * GG_THREADS;
        int row, col, srow, scol;
        bool in;
        float* dst;
        if (kc) {
            row = item / (GG_BK / 4);
            col = 4 * (item % (GG_BK / 4));
            srow = r0 + row;
            scol = k0 + col;
            in = srow < nr && scol < nk;
            dst = tile + row * GG_LDK + col;
        } else {
            row = item / (GG_BM / 4);
            col = 4 * (item % (GG_BM / 4));
            srow = k0 + row;
            scol = r0 + col;
            in = srow < nk && scol < nr;
            dst = tile + row * GG_LDM + col;
        }
        cp16z(dst, in ? src + (long long)srow * ld + scol : src, in ? 16 : 0);
    }
}

// Two f32 of a tile as one bf16 pair: (r, k) and (r, k + 1).
__device__ __forceinline__ u32 gg_pair(const float* tile, int kc, int r, int k) {
    if (kc) {
        float2 v = *(const float2*)(tile + r * GG_LDK + k);
        return pack2(v.x, v.y);
    }
    return pack2(tile[k * GG_LDM + r], tile[(k + 1) * GG_LDM + r]);
}

// One block per output tile of GG_BM × GG_BN, 8 warps as 2 (rows) × 4 (columns), each warp
// 64 × 32. Grid: the total tile count of `count` problems (`problems` in device memory, in tile
// order). `accumulate`: C += (else C =). Dynamic shared memory: GG_SMEM bytes.
extern "C" __global__ void __launch_bounds__(GG_THREADS)
    grouped_gemm_bf16(const GemmProblem* problems, int count, int accumulate) {
    extern __shared__ __align__(16) float gsm[];
    float* as = gsm;                         // [GG_STAGES][GG_TILE]
    float* bs = gsm + GG_STAGES * GG_TILE;   // [GG_STAGES][GG_TILE]
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

    // op(A) is contiguous along k when A is not transposed; op(B) when B is (B stored [n][k]).
    int akc = !p.a_trans, bkc = p.b_trans;
    int steps = (p.k + GG_BK - 1) / GG_BK;
    // The first GG_STAGES − 1 tiles in flight; one commit group per tile (empty past the end),
    // so that "tile s has landed" is always "at most GG_STAGES − 2 groups pending".
#pragma unroll
    for (int s = 0; s < GG_STAGES - 1; ++s) {
        if (s < steps) {
            gg_load(as + s * GG_TILE, p.a, p.lda, akc, m0, p.m, s * GG_BK, p.k);
            gg_load(bs + s * GG_TILE, p.b, p.ldb, bkc, n0, p.n, s * GG_BK, p.k);
        }
        cp_commit();
    }
    for (int s = 0; s < steps; ++s) {
        cp_wait<GG_STAGES - 2>();
        __syncthreads();  // tile s is in, and every warp is done with tile s − 1's buffer
        int next = s + GG_STAGES - 1;
        if (next < steps) {
            int b = next % GG_STAGES;
            gg_load(as + b * GG_TILE, p.a, p.lda, akc, m0, p.m, next * GG_BK, p.k);
            gg_load(bs + b * GG_TILE, p.b, p.ldb, bkc, n0, p.n, next * GG_BK, p.k);
        }
        cp_commit();
        const float* at = as + (s % GG_STAGES) * GG_TILE;
        const float* bt = bs + (s % GG_STAGES) * GG_TILE;
        u32 af[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int r = wm + 16 * i + g;
            af[i][0] = gg_pair(at, akc, r, 2 * t);
            af[i][1] = gg_pair(at, akc, r + 8, 2 * t);
            af[i][2] = gg_pair(at, akc, r, 2 * t + 8);
            af[i][3] = gg_pair(at, akc, r + 8, 2 * t + 8);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int c = wn + 8 * j + g;
            u32 b0 = gg_pair(bt, bkc, c, 2 * t), b1 = gg_pair(bt, bkc, c, 2 * t + 8);
#pragma unroll
            for (int i = 0; i < 4; ++i) mma(acc[i][j], af[i], b0, b1);
        }
    }
    cp_wait<0>();

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
