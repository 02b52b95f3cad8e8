// Fused causal MLA attention in bf16 on the tensor cores (flash-attention style): the scores
// never reach global memory. Compiled by NVRTC once per process for each head shape, with
// -DHEADS=, -DNOPE=, -DROPE=, -DDV= (model/src/device/cuda/flash.rs), so every tile size and loop bound
// below is a compile-time constant.
//
// Layouts (those of the Device trait, f32 in global memory): q [B·T, H·(NOPE+ROPE)], kv
// [B·T, H·(NOPE+DV)] (k_nope then v per head), k_pe [B·T, ROPE] shared by every head, out
// [B·T, H·DV]. A head's key is [k_nope | k_pe]. `flash_pack` first rounds each operand to
// bf16 in a head-major layout [B·H, TP, width rounded to 16] (TP: T rounded up to BQ; the
// padding is zero), so that the kernels copy whole 16-byte chunks into shared memory with
// cp.async, the next tile's copy in flight while the tensor cores work on this one. Every
// product accumulates in f32 (mma.sync m16n8k16).
//
// Forward keeps, per (sequence, head, query), the base-2 log-sum-exp of the scaled scores
// (`lse`), from which backward recomputes each probability. Backward is FlashAttention-2's,
// split in two kernels so that no sum needs an atomic (the results do not depend on timing):
// one per key block for dK and dV, one per query block for dQ.

// (tensor_core.cuh comes first: bf16 rounding, fragment loads, the MMA, cp.async.)

#define NEG_INF __int_as_float(0xff800000)
#define DQK (NOPE + ROPE)
// Head dims rounded up to the MMA's k-step of 16.
#define DQKP ((DQK + 15) / 16 * 16)
#define DVP ((DV + 15) / 16 * 16)
// Shared-memory row widths, padded by 8 bf16 so that the rows of a fragment load fall in
// different banks.
#define LDK (DQKP + 8)
#define LDV (DVP + 8)
// Queries per block (4 warps of 16 rows) and keys per tile in forward and dQ.
#define BQ 64
#define BK 64
// Queries per tile in the dK/dV kernel and keys per tile in the dQ kernel (their accumulators
// leave fewer registers for scores).
#define BQ2 32
#define THREADS 128

// Reductions over the four lanes that hold one row of an accumulator.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- a warp's products over shared-memory tiles ------------------------------------------------

template <int N> __device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
}

// acc (16 × N) += A · Bᵀ over D columns: A the warp's 16 rows of a row-major tile (rows of `lda`),
// B N rows of another (rows of `ldb`); both run along D, so each fragment is one ldmatrix (B's
// two n-tiles at a time).
template <int D, int N>
__device__ __forceinline__ void rows_by_rows(float (*acc)[4], const u16* a, int lda, const u16* b, int ldb, int lane) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        u32 af[4];
        ldsm4(af, a + (lane & 15) * lda + 16 * kk + (lane >> 4) * 8);
#pragma unroll
        for (int jp = 0; jp < N / 16; ++jp) {
            u32 bf[4];
            ldsm4(bf, b + (16 * jp + (lane & 7) + ((lane >> 4) << 3)) * ldb + 16 * kk + ((lane >> 3) & 1) * 8);
            mma(acc[2 * jp], af, bf[0], bf[1]);
            mma(acc[2 * jp + 1], af, bf[2], bf[3]);
        }
    }
}

// acc (16 × D) += C · B: C the warp's 16 × K accumulators (scores or probabilities, rounded to
// bf16 as they become A fragments), B K rows of a row-major tile of D columns (rows of `ldb`),
// read down its columns by the transposing ldmatrix, two n-tiles at a time.
template <int K, int D>
__device__ __forceinline__ void scores_by_rows(float (*acc)[4], float (*c)[4], const u16* b, int ldb, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        u32 af[4];
        c_to_a(af, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
        for (int jp = 0; jp < D / 16; ++jp) {
            u32 bf[4];
            ldsm4_t(bf, b + (16 * kk + (lane & 15)) * ldb + 16 * jp + (lane >> 4) * 8);
            mma(acc[2 * jp], af, bf[0], bf[1]);
            mma(acc[2 * jp + 1], af, bf[2], bf[3]);
        }
    }
}

// ---- packing and staging -----------------------------------------------------------------------

#define QW (HEADS * DQK)
#define KVW (HEADS * (NOPE + DV))
#define OW (HEADS * DV)

// dst [B·H, TP, DP] bf16: element (b·H + h, t, c) is, for t < T and c < width, src[(b·T + t)·stride
// + h·hs + off + c] when c < split and src2[(b·T + t)·ROPE + c − split] after (k_pe), else zero.
// One thread per pair of columns.
extern "C" __global__ void flash_pack(u16* __restrict__ dst, const float* __restrict__ src,
                                      const float* __restrict__ src2, int stride, int hs, int off, int width,
                                      int split, int DP, int B, int T, int TP) {
    long long n = (long long)B * HEADS * TP * (DP / 2);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        int c = 2 * (int)(i % (DP / 2));
        long long r = i / (DP / 2);
        int t = (int)(r % TP), bh = (int)(r / TP), b = bh / HEADS, h = bh % HEADS;
        float v[2] = {0.0f, 0.0f};
        if (t < T) {
            long long row = (long long)b * T + t;
            for (int e = 0; e < 2; ++e) {
                int cc = c + e;
                if (cc < split)
                    v[e] = src[row * stride + (long long)h * hs + off + cc];
                else if (cc < width)
                    v[e] = src2[row * ROPE + cc - split];
            }
        }
        *(u32*)(dst + 2 * i) = pack2(v[0], v[1]);
    }
}

// ROWS rows of DP bf16 from a packed operand (rows from `src`) into shared memory (rows of
// DP + 8), as cp.async copies of 16 bytes; the caller commits and waits.
template <int ROWS, int DP>
__device__ __forceinline__ void stage(u16* __restrict__ dst, const u16* __restrict__ src) {
    constexpr int CHUNKS = ROWS * (DP / 8);
#pragma unroll
    for (int i = threadIdx.x; i < CHUNKS; i += THREADS) {
        int r = i / (DP / 8), ch = i % (DP / 8);
        cp16(dst + r * (DP + 8) + ch * 8, src + (long long)r * DP + ch * 8);
    }
}

// ---- forward -----------------------------------------------------------------------------------

// Grid (B·H, TP/BQ), THREADS threads, dynamic shared memory flash.rs' `fwd` bytes; the last
// query blocks (the most keys) start first. qp, kp: packed [B·H, TP, DQKP]; vp: [B·H, TP, DVP].
// out: [B·T, OW]; lse: [B, H, T]. `scale_log2` is the softmax scale times log2(e).
extern "C" __global__ void __launch_bounds__(THREADS)
    flash_fwd(const u16* __restrict__ qp, const u16* __restrict__ kp, const u16* __restrict__ vp,
              float* __restrict__ out, float* __restrict__ lse, int B, int T, int TP, float scale_log2) {
    extern __shared__ __align__(16) u16 smem[];
    u16* ks = smem;                // [2][BK][LDK]
    u16* vs = ks + 2 * BK * LDK;   // [2][BK][LDV]
    const long long bh = blockIdx.x;
    int qb = gridDim.y - 1 - blockIdx.y;
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = qb * BQ + 16 * w;  // this warp's first query
    const u16* kh = kp + bh * TP * DQKP;
    const u16* vh = vp + bh * TP * DVP;

    stage<BK, DQKP>(ks, kh);
    stage<BK, DVP>(vs, vh);
    cp_commit();

    // The warp's 16 query rows as A fragments, straight from global memory.
    u32 qa[DQKP / 16][4];
    {
        const u16* q0 = qp + (bh * TP + row0 + g) * DQKP + 2 * t;
#pragma unroll
        for (int kk = 0; kk < DQKP / 16; ++kk) {
            qa[kk][0] = ld2(q0 + 16 * kk);
            qa[kk][1] = ld2(q0 + 8 * DQKP + 16 * kk);
            qa[kk][2] = ld2(q0 + 16 * kk + 8);
            qa[kk][3] = ld2(q0 + 8 * DQKP + 16 * kk + 8);
        }
    }

    float o[DVP / 8][4];
    zero<DVP / 8>(o);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    for (int kb = 0; kb <= qb; ++kb) {
        const u16* kt = ks + (kb & 1) * BK * LDK;
        const u16* vt = vs + (kb & 1) * BK * LDV;
        if (kb < qb) {  // the next tile's copy, into the other buffer
            stage<BK, DQKP>(ks + ((kb + 1) & 1) * BK * LDK, kh + (long long)(kb + 1) * BK * DQKP);
            stage<BK, DVP>(vs + ((kb + 1) & 1) * BK * LDV, vh + (long long)(kb + 1) * BK * DVP);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();

        // S = Q Kᵀ for the warp's 16 rows × BK keys (K's fragments two key-tiles at a time).
        float s[BK / 8][4];
        zero<BK / 8>(s);
#pragma unroll
        for (int jp = 0; jp < BK / 16; ++jp) {
            const u16* kr = kt + (16 * jp + (lane & 7) + ((lane >> 4) << 3)) * LDK + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int kk = 0; kk < DQKP / 16; ++kk) {
                u32 bf[4];
                ldsm4(bf, kr + 16 * kk);
                mma(s[2 * jp], qa[kk], bf[0], bf[1]);
                mma(s[2 * jp + 1], qa[kk], bf[2], bf[3]);
            }
        }
        // Scale, mask (key after query, or past T), and the online softmax.
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = kb * BK + j * 8 + 2 * t + (e & 1), r = row0 + g + (e >> 1) * 8;
                float v = s[j][e] * scale_log2;
                if (key > r || key >= T) v = NEG_INF;
                s[j][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
        float alpha[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = quad_max(mx[i]);
            alpha[i] = exp2f(m[i] - mx[i]);
            m[i] = mx[i];
            l[i] *= alpha[i];
        }
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[j][e] - m[e >> 1]);
                s[j][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int j = 0; j < DVP / 8; ++j) {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
        }
        // O += P V.
        scores_by_rows<BK, DVP>(o, s, vt, LDV, lane);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] = quad_sum(l[i]);
        int r = row0 + g + 8 * i;
        if (r < T && t == 0) lse[bh * T + r] = m[i] + log2f(l[i]);
    }
    int b = (int)(bh / HEADS), h = (int)(bh % HEADS);
#pragma unroll
    for (int j = 0; j < DVP / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int r = row0 + g + (e >> 1) * 8, c = j * 8 + 2 * t + (e & 1);
            if (r < T && c < DV) out[((long long)b * T + r) * OW + h * DV + c] = o[j][e] / l[e >> 1];
        }
    }
}

// ---- backward ----------------------------------------------------------------------------------

// delta[b, h, t] = Σ_c dout · out over the head's DV columns: one warp per (b, h, t).
extern "C" __global__ void flash_bwd_delta(const float* __restrict__ out, const float* __restrict__ dout,
                                           float* __restrict__ delta, int B, int T) {
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= (long long)B * HEADS * T) return;
    int t = (int)(row % T), bh = (int)(row / T), b = bh / HEADS, h = bh % HEADS;
    long long base = ((long long)b * T + t) * OW + h * DV;
    float acc = 0.0f;
    for (int c = lane; c < DV; c += 32) acc += out[base + c] * dout[base + c];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) delta[row] = acc;
}

// dK and dV for one block of BK keys (4 warps of 16): a loop over the query tiles (BQ2 rows)
// from the diagonal on, each tile's copy in flight during the previous one. Grid (B·H, TP/BK),
// block 0 (the most queries) first; dynamic shared memory flash.rs' `bwd_kv` bytes. qp, kp, vp,
// dop: packed operands. dk: [B, H, T, DQK] (every head's own k_pe gradient; the caller sums
// them); dv goes into dkv's v columns. `scale` is the softmax scale.
extern "C" __global__ void __launch_bounds__(THREADS)
    flash_bwd_kv(const u16* __restrict__ qp, const u16* __restrict__ kp, const u16* __restrict__ vp,
                 const u16* __restrict__ dop, const float* __restrict__ lse, const float* __restrict__ delta,
                 float* __restrict__ dk, float* __restrict__ dkv, int B, int T, int TP, float scale,
                 float scale_log2) {
    extern __shared__ __align__(16) u16 smem[];
    u16* ks = smem;                  // [BK][LDK]
    u16* vs = ks + BK * LDK;         // [BK][LDV]
    u16* qs = vs + BK * LDV;         // [2][BQ2][LDK]
    u16* dos = qs + 2 * BQ2 * LDK;   // [2][BQ2][LDV]
    const long long bh = blockIdx.x;
    int kb = blockIdx.y;
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int key0 = kb * BK + 16 * w;  // this warp's first key
    const u16* qh = qp + bh * TP * DQKP;
    const u16* dh = dop + bh * TP * DVP;
    int qt0 = kb * BK / BQ2, nq = TP / BQ2;

    stage<BK, DQKP>(ks, kp + (bh * TP + kb * BK) * DQKP);
    stage<BK, DVP>(vs, vp + (bh * TP + kb * BK) * DVP);
    stage<BQ2, DQKP>(qs, qh + (long long)qt0 * BQ2 * DQKP);
    stage<BQ2, DVP>(dos, dh + (long long)qt0 * BQ2 * DVP);
    cp_commit();

    float dkacc[DQKP / 8][4], dvacc[DVP / 8][4];
    zero<DQKP / 8>(dkacc);
    zero<DVP / 8>(dvacc);

    const u16* kw = ks + 16 * w * LDK;  // the warp's key rows
    const u16* vw = vs + 16 * w * LDV;
    for (int qt = qt0; qt < nq; ++qt) {
        int q0 = qt * BQ2, buf = (qt - qt0) & 1;
        const u16* qtile = qs + buf * BQ2 * LDK;
        const u16* dtile = dos + buf * BQ2 * LDV;
        if (qt + 1 < nq) {
            stage<BQ2, DQKP>(qs + (buf ^ 1) * BQ2 * LDK, qh + (long long)(qt + 1) * BQ2 * DQKP);
            stage<BQ2, DVP>(dos + (buf ^ 1) * BQ2 * LDV, dh + (long long)(qt + 1) * BQ2 * DVP);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();

        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for the warp's 16 keys × BQ2 queries.
        float st[BQ2 / 8][4], dpt[BQ2 / 8][4];
        zero<BQ2 / 8>(st);
        zero<BQ2 / 8>(dpt);
        rows_by_rows<DQKP, BQ2>(st, kw, LDK, qtile, LDK, lane);
        rows_by_rows<DVP, BQ2>(dpt, vw, LDV, dtile, LDV, lane);
        // Pᵀ from the kept lse; dSᵀ = Pᵀ ⊙ (dPᵀ − delta) · scale. Zero where the key comes after
        // the query or the query is past T.
#pragma unroll
        for (int j = 0; j < BQ2 / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int qi = q0 + j * 8 + 2 * t + (e & 1), key = key0 + g + (e >> 1) * 8;
                float p = 0.0f, d = 0.0f;
                if (key <= qi && qi < T) {
                    p = exp2f(st[j][e] * scale_log2 - lse[bh * T + qi]);
                    d = delta[bh * T + qi];
                }
                st[j][e] = p;
                dpt[j][e] = p * (dpt[j][e] - d) * scale;
            }
        }
        // dV += Pᵀ dO and dK += dSᵀ Q.
        scores_by_rows<BQ2, DVP>(dvacc, st, dtile, LDV, lane);
        scores_by_rows<BQ2, DQKP>(dkacc, dpt, qtile, LDK, lane);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

    int b = (int)(bh / HEADS), h = (int)(bh % HEADS);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        int key = key0 + g + (e >> 1) * 8;
        if (key >= T) continue;
#pragma unroll
        for (int j = 0; j < DQKP / 8; ++j) {
            int c = j * 8 + 2 * t + (e & 1);
            if (c < DQK) dk[(bh * T + key) * DQK + c] = dkacc[j][e];
        }
#pragma unroll
        for (int j = 0; j < DVP / 8; ++j) {
            int c = j * 8 + 2 * t + (e & 1);
            if (c < DV) dkv[((long long)b * T + key) * KVW + h * (NOPE + DV) + NOPE + c] = dvacc[j][e];
        }
    }
}

// dQ for one block of BQ queries (4 warps of 16): a loop over the key tiles (BQ2 keys) up to
// the diagonal, each tile's copy in flight during the previous one. Grid (B·H, TP/BQ), the last
// query blocks first; dynamic shared memory flash.rs' `bwd_q` bytes. dq: [B·T, QW].
extern "C" __global__ void __launch_bounds__(THREADS)
    flash_bwd_q(const u16* __restrict__ qp, const u16* __restrict__ kp, const u16* __restrict__ vp,
                const u16* __restrict__ dop, const float* __restrict__ lse, const float* __restrict__ delta,
                float* __restrict__ dq, int B, int T, int TP, float scale, float scale_log2) {
    extern __shared__ __align__(16) u16 smem[];
    u16* qs = smem;                  // [BQ][LDK]
    u16* dos = qs + BQ * LDK;        // [BQ][LDV]
    u16* ks = dos + BQ * LDV;        // [2][BQ2][LDK]
    u16* vs = ks + 2 * BQ2 * LDK;    // [2][BQ2][LDV]
    const long long bh = blockIdx.x;
    int qb = gridDim.y - 1 - blockIdx.y;
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = qb * BQ + 16 * w;
    const u16* kh = kp + bh * TP * DQKP;
    const u16* vh = vp + bh * TP * DVP;

    stage<BQ, DQKP>(qs, qp + (bh * TP + qb * BQ) * DQKP);
    stage<BQ, DVP>(dos, dop + (bh * TP + qb * BQ) * DVP);
    stage<BQ2, DQKP>(ks, kh);
    stage<BQ2, DVP>(vs, vh);
    cp_commit();
    float lr[2], dr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        int r = row0 + g + 8 * i;
        lr[i] = r < T ? lse[bh * T + r] : 0.0f;
        dr[i] = r < T ? delta[bh * T + r] : 0.0f;
    }
    const u16* qw = qs + 16 * w * LDK;
    const u16* dw = dos + 16 * w * LDV;

    float dqacc[DQKP / 8][4];
    zero<DQKP / 8>(dqacc);

    int nk = (qb + 1) * BQ / BQ2;  // key tiles up to and including the diagonal
    for (int kb = 0; kb < nk; ++kb) {
        int buf = kb & 1;
        const u16* ktile = ks + buf * BQ2 * LDK;
        const u16* vtile = vs + buf * BQ2 * LDV;
        if (kb + 1 < nk) {
            stage<BQ2, DQKP>(ks + (buf ^ 1) * BQ2 * LDK, kh + (long long)(kb + 1) * BQ2 * DQKP);
            stage<BQ2, DVP>(vs + (buf ^ 1) * BQ2 * LDV, vh + (long long)(kb + 1) * BQ2 * DVP);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();

        float s[BQ2 / 8][4], dp[BQ2 / 8][4];
        zero<BQ2 / 8>(s);
        zero<BQ2 / 8>(dp);
        rows_by_rows<DQKP, BQ2>(s, qw, LDK, ktile, LDK, lane);
        rows_by_rows<DVP, BQ2>(dp, dw, LDV, vtile, LDV, lane);
#pragma unroll
        for (int j = 0; j < BQ2 / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = kb * BQ2 + j * 8 + 2 * t + (e & 1), r = row0 + g + (e >> 1) * 8;
                float p = (key <= r && key < T) ? exp2f(s[j][e] * scale_log2 - lr[e >> 1]) : 0.0f;
                dp[j][e] = p * (dp[j][e] - dr[e >> 1]) * scale;
            }
        }
        // dQ += dS K.
        scores_by_rows<BQ2, DQKP>(dqacc, dp, ktile, LDK, lane);
        __syncthreads();  // every warp is done with this buffer before it is refilled
    }

    int b = (int)(bh / HEADS), h = (int)(bh % HEADS);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        int r = row0 + g + (e >> 1) * 8;
        if (r >= T) continue;
#pragma unroll
        for (int j = 0; j < DQKP / 8; ++j) {
            int c = j * 8 + 2 * t + (e & 1);
            if (c < DQK) dq[((long long)b * T + r) * QW + h * DQK + c] = dqacc[j][e];
        }
    }
}
