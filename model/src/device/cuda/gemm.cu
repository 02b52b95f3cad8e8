// The routed experts' grouped GEMM in bf16 on the tensor cores: one launch for every expert's
// problem of a projection, f32 in global memory, operands rounded to bf16 as they become MMA
// fragments, f32 accumulation (mma.sync m16n8k16). cuBLAS 13.0's grouped GEMM takes f32
// operands only at TF32 (model/src/device/cuda/grouped.rs); this is its bf16 counterpart.
//
// Tiles reach shared memory by cp.async, GG_STAGES − 1 of them in flight while the tensor cores
// work on another, in the layout each operand has in global memory (the direction contiguous
// there stays contiguous, so every copy is 16 bytes). Each step's tiles are rounded to bf16 once,
// into a copy from which ldmatrix reads the fragments (transposing where a tile runs along m or
// n rather than k). The operands' contiguous extents and
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
#define GG_BK 32
#define GG_STAGES 4
#define GG_THREADS 256
// f32 rows in shared memory: a tile contiguous along k is [128][GG_LDK], one contiguous along m
// or n [GG_BK][GG_LDM] (rows padded by 4 floats: 16-byte aligned, and the conversion's float4
// reads of neighbouring rows fall in distinct banks).
#define GG_LDK (GG_BK + 4)
#define GG_LDM (GG_BM + 4)
#define GG_TILE (GG_BM * GG_LDK)  // floats per operand per stage (≥ GG_BK × GG_LDM)
// The bf16 copies of a step's tiles that ldmatrix reads (two: the next step's is written while
// this step's is read), in the same orientation: rows padded by 8 bf16, so that the eight rows
// of a fragment load fall in distinct banks.
#define GG_LDK16 (GG_BK + 8)
#define GG_LDM16 (GG_BM + 8)
#define GG_TILE16 (GG_BM * GG_LDK16)  // bf16 per operand (≥ GG_BK × GG_LDM16)
// Dynamic shared memory in bytes (grouped.rs sets the kernel's limit to it): 184 KiB.
#define GG_SMEM (2 * GG_STAGES * GG_TILE * 4 + 2 * 2 * GG_TILE16 * 2)
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

// One operand's f32 tile rounded to bf16 pairs (one cvt each) in `dst`, in the same orientation:
// each thread 16 neighbouring values of one row, four float4 in, two 16-byte stores out.
__device__ __forceinline__ void gg_convert(u16* dst, const float* src, int kc) {
    int i = threadIdx.x;
    const float* s;
    u16* d;
    if (kc) {
        s = src + (i >> 1) * GG_LDK + (i & 1) * 16;
        d = dst + (i >> 1) * GG_LDK16 + (i & 1) * 16;
    } else {
        s = src + (i >> 3) * GG_LDM + (i & 7) * 16;
        d = dst + (i >> 3) * GG_LDM16 + (i & 7) * 16;
    }
    u32 w[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        float4 v = ((const float4*)s)[j];
        w[2 * j] = pack2(v.x, v.y);
        w[2 * j + 1] = pack2(v.z, v.w);
    }
    ((uint4*)d)[0] = make_uint4(w[0], w[1], w[2], w[3]);
    ((uint4*)d)[1] = make_uint4(w[4], w[5], w[6], w[7]);
}

// The A fragment of rows r0..r0+16 over k = k0..k0+16 of op(A)'s bf16 tile: one ldmatrix, read
// across the rows where the tile runs along k, down its columns (transposing) where it runs
// along m.
__device__ __forceinline__ void gg_frag_a(u32* af, const u16* t, int kc, int r0, int k0, int lane) {
    if (kc)
        ldsm4(af, t + (r0 + (lane & 15)) * GG_LDK16 + k0 + (lane >> 4) * 8);
    else
        ldsm4_t(af, t + (k0 + (lane & 7) + ((lane >> 4) << 3)) * GG_LDM16 + r0 + ((lane >> 3) & 1) * 8);
}

// The B fragments of columns c0..c0+16 (two n-tiles: bf[0], bf[1] the first, bf[2], bf[3] the
// second) over k = k0..k0+16 of op(B)'s bf16 tile, stored [n][k] where `kc`, else [k][n].
__device__ __forceinline__ void gg_frag_b(u32* bf, const u16* t, int kc, int c0, int k0, int lane) {
    if (kc)
        ldsm4(bf, t + (c0 + (lane & 7) + ((lane >> 4) << 3)) * GG_LDK16 + k0 + ((lane >> 3) & 1) * 8);
    else
        ldsm4_t(bf, t + (k0 + (lane & 15)) * GG_LDM16 + c0 + (lane >> 4) * 8);
}

// One block per output tile of GG_BM × GG_BN, 8 warps as 2 (rows) × 4 (columns), each warp
// 64 × 32. Grid: the total tile count of `count` problems (`problems` in device memory, in tile
// order). `accumulate`: C += (else C =). Dynamic shared memory: GG_SMEM bytes.
//
// Each step of GG_BK: one barrier, the copy of a later step's f32 tiles started, the next
// step's tiles rounded to bf16 (every value once, by the whole block) into one copy while the
// warps' MMAs read this step's fragments from the other by ldmatrix.
extern "C" __global__ void __launch_bounds__(GG_THREADS)
    grouped_gemm_bf16(const GemmProblem* problems, int count, int accumulate) {
    extern __shared__ __align__(16) float gsm[];
    float* as = gsm;                                   // [GG_STAGES][GG_TILE]
    float* bs = gsm + GG_STAGES * GG_TILE;             // [GG_STAGES][GG_TILE]
    // Two bf16 copies, each A's tile then B's: [2][2][GG_TILE16].
    u16* a16 = (u16*)(gsm + 2 * GG_STAGES * GG_TILE);
    u16* b16 = a16 + GG_TILE16;
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
    // so that "tile s has landed" is "at most (tiles issued − s − 1) groups pending".
#pragma unroll
    for (int s = 0; s < GG_STAGES - 1; ++s) {
        if (s < steps) {
            gg_load(as + s * GG_TILE, p.a, p.lda, akc, m0, p.m, s * GG_BK, p.k);
            gg_load(bs + s * GG_TILE, p.b, p.ldb, bkc, n0, p.n, s * GG_BK, p.k);
        }
        cp_commit();
    }
    cp_wait<GG_STAGES - 2>();
    __syncthreads();
    gg_convert(a16, as, akc);
    gg_convert(b16, bs, bkc);
    for (int s = 0; s < steps; ++s) {
        // Tiles through s + GG_STAGES − 2 were issued: wait for tile s + 1. After the barrier,
        // step s's bf16 copy is complete, every warp is done with step s − 1's MMAs (so the other
        // copy is free) and with tile s − 1's f32 buffer (converted a step ago).
        cp_wait<GG_STAGES - 3>();
        __syncthreads();
        int next = s + GG_STAGES - 1;
        if (next < steps) {
            int b = next % GG_STAGES;
            gg_load(as + b * GG_TILE, p.a, p.lda, akc, m0, p.m, next * GG_BK, p.k);
            gg_load(bs + b * GG_TILE, p.b, p.ldb, bkc, n0, p.n, next * GG_BK, p.k);
        }
        cp_commit();
        // Round step s + 1's tiles into the other copy while this step's MMAs run (the warps
        // interleave the two).
        if (s + 1 < steps) {
            int f = (s + 1) % GG_STAGES;
            gg_convert(a16 + ((s + 1) & 1) * 2 * GG_TILE16, as + f * GG_TILE, akc);
            gg_convert(b16 + ((s + 1) & 1) * 2 * GG_TILE16, bs + f * GG_TILE, bkc);
        }
        const u16* at = a16 + (s & 1) * 2 * GG_TILE16;
        const u16* bt = b16 + (s & 1) * 2 * GG_TILE16;
#pragma unroll
        for (int kk = 0; kk < GG_BK; kk += 16) {
            u32 af[4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i) gg_frag_a(af[i], at, akc, wm + 16 * i, kk, lane);
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                u32 bf[4];
                gg_frag_b(bf, bt, bkc, wn + 16 * jp, kk, lane);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    mma(acc[i][2 * jp], af[i], bf[0], bf[1]);
                    mma(acc[i][2 * jp + 1], af[i], bf[2], bf[3]);
                }
            }
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
