// Flotilla's CUDA kernels: every device operation that is not a GEMM, in f32.
//
// Compiled once per process by NVRTC (model/src/device/cuda/module.rs) and loaded into each
// device's context. Each kernel is the GPU version of a host kernel in model/src/device/kernels.rs
// (or attention.rs, optim/kernel.rs) and follows its math line by line; the Rust side
// (cuda/*.rs) says which launch shape each one expects. Reductions that must not depend on
// timing (scatter-add, weight gradients, Σg²) run in a fixed order: no atomics anywhere.

typedef long long i64;
typedef unsigned int u32;

// NVRTC has no <math.h>.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define FOR_EACH(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// ---- reductions inside a block (blockDim.x a multiple of 32, at most 1024) --------------------

struct Sum {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// `v` reduced by `op` over the block (`identity` pads the missing warps), returned to every
// thread; `sh` is the caller's shared scratch of 32 values.
template <typename T, typename Op> __device__ T block_reduce(T v, Op op, T identity, T* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_reduce(v, op);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : identity;
    if (w == 0) v = warp_reduce(v, op);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

__device__ float block_sum(float v) {
    __shared__ float sh[32];
    return block_reduce(v, Sum(), 0.0f, sh);
}

__device__ float block_max(float v) {
    __shared__ float sh[32];
    return block_reduce(v, Max(), -INFINITY, sh);
}

__device__ double block_sum_d(double v) {
    __shared__ double sh[32];
    return block_reduce(v, Sum(), 0.0, sh);
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum()); }

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---- whole tensors -----------------------------------------------------------------------------

extern "C" __global__ void fill_f32(float* x, float v, i64 n) {
    FOR_EACH(i, n) x[i] = v;
}

extern "C" __global__ void scale_f32(float* x, float s, i64 n) {
    FOR_EACH(i, n) x[i] *= s;
}

extern "C" __global__ void add_assign_f32(float* dst, const float* src, i64 n) {
    FOR_EACH(i, n) dst[i] += src[i];
}

// ---- many tensors in one launch (train.rs) -----------------------------------------------------
// A launch over T tensors reads a table of 64-bit words: L lists of T pointers (list l, tensor t
// at [l*T + t]), then T lengths, then T+1 chunk starts (tensor t's chunks of `chunk` values are
// first[t] .. first[t+1]), then T offsets into a flat buffer. One block per chunk (grid-stride).

typedef unsigned long long u64;

// Tensor t, and the range [*s, *e) of its values, of global chunk c.
__device__ __forceinline__ int mt_chunk(const u64* tab, int T, int L, i64 chunk, i64 c, i64* s, i64* e) {
    const i64* len = (const i64*)(tab + (i64)L * T);
    const i64* first = len + T;
    int lo = 0, hi = T - 1;  // the last tensor whose chunks start at or before c
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (first[mid] <= c) lo = mid; else hi = mid - 1;
    }
    *s = (c - first[lo]) * chunk;
    *e = *s + chunk < len[lo] ? *s + chunk : len[lo];
    return lo;
}

__device__ __forceinline__ i64 mt_chunks(const u64* tab, int T, int L) {
    return ((const i64*)(tab + (i64)L * T))[2 * T];
}

__device__ __forceinline__ i64 mt_offset(const u64* tab, int T, int L, int t) {
    return ((const i64*)(tab + (i64)L * T))[2 * T + 1 + t];
}

extern "C" __global__ void mt_fill(const u64* tab, int T, i64 chunk, float v) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 1); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 1, chunk, c, &s, &e);
        float* x = (float*)tab[t];
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) x[i] = v;
    }
}

extern "C" __global__ void mt_scale(const u64* tab, int T, i64 chunk, float a) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 1); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 1, chunk, c, &s, &e);
        float* x = (float*)tab[t];
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) x[i] *= a;
    }
}

// flat[offset[t] + i] = x_t[i] * a: a gradient bucket.
extern "C" __global__ void mt_pack(const u64* tab, int T, i64 chunk, float* flat, float a) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 1); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 1, chunk, c, &s, &e);
        const float* x = (const float*)tab[t];
        float* out = flat + mt_offset(tab, T, 1, t);
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) out[i] = x[i] * a;
    }
}

extern "C" __global__ void mt_unpack(const u64* tab, int T, i64 chunk, const float* flat) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 1); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 1, chunk, c, &s, &e);
        float* x = (float*)tab[t];
        const float* in = flat + mt_offset(tab, T, 1, t);
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) x[i] = in[i];
    }
}

// Σ x² of every piece (chunk) of every tensor, in f64, out[c] for global piece c (the CPU sums
// the same pieces; the host adds them up in order).
extern "C" __global__ void mt_sum_squares(const u64* tab, int T, i64 chunk, double* out) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 1); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 1, chunk, c, &s, &e);
        const float* x = (const float*)tab[t];
        double acc = 0.0;
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) {
            double v = (double)x[i];
            acc += v * v;
        }
        acc = block_sum_d(acc);
        if (threadIdx.x == 0) out[c] = acc;
        __syncthreads();
    }
}

// AdamW in place over lists (value, grad, exp_avg, exp_avg_sq): optim/kernel.rs `Coef::apply`,
// torch.lerp's two-sided formula included; each gradient is first scaled by the clip's gscale
// (rounded on its own, as when the clip scaled the gradients in memory).
extern "C" __global__ void mt_adamw(const u64* tab, int T, i64 chunk, int has_decay, float decay,
                                    int lerp_small, float w1, float beta2, float w2, float eps,
                                    float bc2_sqrt, float step_size, float gscale) {
    for (i64 c = blockIdx.x; c < mt_chunks(tab, T, 4); c += gridDim.x) {
        i64 s, e;
        int t = mt_chunk(tab, T, 4, chunk, c, &s, &e);
        float* p = (float*)tab[t];
        const float* g = (const float*)tab[T + t];
        float* m = (float*)tab[2 * T + t];
        float* v = (float*)tab[3 * T + t];
        for (i64 i = s + threadIdx.x; i < e; i += blockDim.x) {
            float pv = has_decay ? p[i] * decay : p[i];
            float gv = __fmul_rn(g[i], gscale), mv = m[i];
            mv = lerp_small ? mv + w1 * (gv - mv) : gv - (gv - mv) * (1.0f - w1);
            float vv = v[i] * beta2 + w2 * gv * gv;
            float denom = sqrtf(vv) / bc2_sqrt + eps;
            p[i] = pv + -step_size * (mv / denom);
            m[i] = mv;
            v[i] = vv;
        }
    }
}

// ---- rows and columns --------------------------------------------------------------------------

// dst[r, dst_col0 + c] = src[r, src_col0 + c] for c < width.
extern "C" __global__ void copy_cols(const float* src, int src_cols, int src_col0, float* dst,
                                     int dst_cols, int dst_col0, int width, i64 rows) {
    FOR_EACH(i, rows * width) {
        i64 r = i / width;
        int c = (int)(i % width);
        dst[r * dst_cols + dst_col0 + c] = src[r * src_cols + src_col0 + c];
    }
}

// out[r] = src[idx[r]].
extern "C" __global__ void gather_rows(const float* src, const u32* idx, float* out, i64 rows, int cols) {
    FOR_EACH(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        out[i] = src[(i64)idx[r] * cols + c];
    }
}

// dst[dst_rows[j]] += src[src_rows[p]] for p in offs[j]..offs[j+1], in that order: the
// host sorted the scatter by destination (stable), so each row's sum has the CPU's order.
extern "C" __global__ void scatter_add_sorted(float* dst, const float* src, const int* dst_rows,
                                              const int* offs, const int* src_rows, int groups, int cols) {
    FOR_EACH(i, (i64)groups * cols) {
        int j = (int)(i / cols);
        int c = (int)(i % cols);
        float* d = dst + (i64)dst_rows[j] * cols + c;
        float acc = *d;
        for (int p = offs[j]; p < offs[j + 1]; ++p) acc += src[(i64)src_rows[p] * cols + c];
        *d = acc;
    }
}

// x[r, :] *= s[r].
extern "C" __global__ void scale_rows(float* x, const float* s, i64 rows, int cols) {
    FOR_EACH(i, rows * cols) x[i] *= s[i / cols];
}

// out[r] = dot(a[r], b[r]): one warp per row.
extern "C" __global__ void rows_dot(const float* a, const float* b, float* out, i64 rows, int cols) {
    int lane = threadIdx.x & 31;
    i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        float acc = 0.0f;
        for (int c = lane; c < cols; c += 32) acc += a[r * cols + c] * b[r * cols + c];
        acc = warp_sum(acc);
        if (lane == 0) out[r] = acc;
    }
}

// The experts' combine, Device::combine_rows: y[t] = Σ s[r] · x[r] (or Σ x[r] without s) over
// the rows r = srcs[p], p in offs[t]..offs[t+1] (sorted by destination on the host, so each sum
// runs in the CPU's order), every row t written. The product is rounded before the sum, as
// scale_rows then scatter_add_sorted rounded it.
extern "C" __global__ void combine_rows(const float* x, const float* s, const int* offs, const int* srcs,
                                        float* y, i64 rows, int cols) {
    FOR_EACH(i, rows * cols) {
        i64 t = i / cols;
        int c = (int)(i % cols);
        float acc = 0.0f;
        for (int p = offs[t]; p < offs[t + 1]; ++p) {
            i64 r = srcs[p];
            float v = x[r * cols + c];
            acc += s ? __fmul_rn(v, s[r]) : v;
        }
        y[i] = acc;
    }
}

// Device::combine_rows_backward, one warp per row r of x: dx[r] = s[r] · dy[idx[r]] and
// ds[r] = dot(dy[idx[r]], x[r]) (rows_dot's order).
extern "C" __global__ void combine_rows_bwd(const float* dy, const float* x, const float* s, const u32* idx,
                                            float* dx, float* ds, i64 rows, int cols) {
    int lane = threadIdx.x & 31;
    i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 r = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        const float* g = dy + (i64)idx[r] * cols;
        float sr = s[r];
        float acc = 0.0f;
        for (int c = lane; c < cols; c += 32) {
            float v = g[c];
            acc += v * x[r * cols + c];
            dx[r * cols + c] = __fmul_rn(v, sr);
        }
        acc = warp_sum(acc);
        if (lane == 0) ds[r] = acc;
    }
}

// ---- RMSNorm (one block per row) ---------------------------------------------------------------

extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* rstd, int d, float eps) {
    const float* xr = x + (i64)blockIdx.x * d;
    float* yr = y + (i64)blockIdx.x * d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / d + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int c = threadIdx.x; c < d; c += blockDim.x) yr[c] = w[c] * (xr[c] * r);
}

// dx = rstd (dy⊙w − x·rstd · mean(dy⊙w⊙x·rstd)).
extern "C" __global__ void rmsnorm_bwd_input(const float* x, const float* w, const float* rstd,
                                             const float* dy, float* dx, int d) {
    i64 off = (i64)blockIdx.x * d;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dot += x[off + c] * dy[off + c] * w[c];
    float mean = block_sum(dot) * r / d;
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        dx[off + c] = r * (dy[off + c] * w[c] - x[off + c] * r * mean);
}

// partial[chunk, c] = Σ over the chunk's rows of dy·x·rstd (grid: column blocks × chunks).
extern "C" __global__ void rmsnorm_bwd_weight_partial(const float* x, const float* rstd, const float* dy,
                                                      float* partial, i64 rows, int d, int rows_per_chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    i64 r0 = (i64)blockIdx.y * rows_per_chunk;
    i64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float acc = 0.0f;
    for (i64 r = r0; r < r1; ++r) acc += dy[r * d + c] * x[r * d + c] * rstd[r];
    partial[(i64)blockIdx.y * d + c] = acc;
}

// dst[c] += Σ_k partial[k, c], k in order.
extern "C" __global__ void add_column_sums(const float* partial, int chunks, int d, float* dst) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float acc = 0.0f;
    for (int k = 0; k < chunks; ++k) acc += partial[(i64)k * d + c];
    dst[c] += acc;
}

// ---- SwiGLU ----------------------------------------------------------------------------------

extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* h, i64 n) {
    FOR_EACH(i, n) h[i] = g[i] * sigmoidf(g[i]) * u[i];
}

extern "C" __global__ void swiglu_bwd(const float* g, const float* u, const float* dh, float* dg,
                                      float* du, i64 n) {
    FOR_EACH(i, n) {
        float s = sigmoidf(g[i]);
        du[i] = dh[i] * g[i] * s;
        dg[i] = dh[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    }
}

// ---- RoPE (one thread per rotated pair; a block holds whole (row, head) units; dim ≤ 256) ------

// Each (row, head) unit's h = dim/2 pairs are read by its h threads, the block waits, then they
// write: the interleaved layouts move values between pairs, in place.
extern "C" __global__ void rope(float* x, int cols, const float* table, int seq_len, int heads,
                                int head_stride, int offset, int dim, int interleave, int inverse, i64 rows) {
    int h = dim / 2;
    int per = blockDim.x / h;
    int u = threadIdx.x / h, k = threadIdx.x % h;
    i64 units = rows * heads;
    for (i64 first = (i64)blockIdx.x * per; first < units; first += (i64)gridDim.x * per) {
        i64 i = first + u;
        bool live = u < per && i < units;
        float a = 0.0f, b = 0.0f, c = 0.0f, s = 0.0f;
        float* v = x;
        if (live) {
            i64 r = i / heads;
            int head = (int)(i % heads);
            const float* cs = table + (i64)(r % seq_len) * dim;
            c = cs[k];
            s = cs[h + k];
            v = x + r * cols + (i64)head * head_stride + offset;
            bool il = interleave && !inverse;
            a = il ? v[2 * k] : v[k];
            b = il ? v[2 * k + 1] : v[h + k];
        }
        __syncthreads();
        if (live) {
            if (!inverse) {
                v[k] = a * c - b * s;
                v[h + k] = b * c + a * s;
            } else {
                float t0 = a * c + b * s, t1 = b * c - a * s;
                if (interleave) {
                    v[2 * k] = t0;
                    v[2 * k + 1] = t1;
                } else {
                    v[k] = t0;
                    v[h + k] = t1;
                }
            }
        }
        __syncthreads();
    }
}

// ---- attention: layouts and the causal softmax ------------------------------------------------

// Element i of a walk over [B, H, T, width]: its offset in the head-major layout (rows of
// `hw`, columns from `hoff`) and in the token-major one (rows of `rw`, heads `rhs` apart,
// columns from `roff`).
struct HeadsIndex {
    i64 heads, tokens;
};

__device__ __forceinline__ HeadsIndex heads_index(i64 i, int width, int T, int H, int hw, int hoff,
                                                  int rw, int rhs, int roff) {
    int c = (int)(i % width);
    i64 q = i / width;
    int t = (int)(q % T);
    q /= T;
    int h = (int)(q % H);
    int b = (int)(q / H);
    HeadsIndex x;
    x.heads = (((i64)b * H + h) * T + t) * hw + hoff + c;
    x.tokens = ((i64)b * T + t) * rw + (i64)h * rhs + roff + c;
    return x;
}

// dst[((b*H + h)*T + t)*dst_w + dst_off + c] = src[(b*T + t)*src_cols + h*src_hs + src_off + c].
extern "C" __global__ void to_heads(const float* src, int src_cols, int src_hs, int src_off, float* dst,
                                    int dst_w, int dst_off, int width, int B, int T, int H) {
    FOR_EACH(i, (i64)B * H * T * width) {
        HeadsIndex x = heads_index(i, width, T, H, dst_w, dst_off, src_cols, src_hs, src_off);
        dst[x.heads] = src[x.tokens];
    }
}

// The inverse of to_heads: dst[(b*T + t)*dst_cols + h*dst_hs + dst_off + c] = src[...bhtd...].
extern "C" __global__ void from_heads(const float* src, int src_w, int src_off, float* dst, int dst_cols,
                                      int dst_hs, int dst_off, int width, int B, int T, int H) {
    FOR_EACH(i, (i64)B * H * T * width) {
        HeadsIndex x = heads_index(i, width, T, H, src_w, src_off, dst_cols, dst_hs, dst_off);
        dst[x.tokens] = src[x.heads];
    }
}

// dst[(b*T + t)*width + c] = Σ_h src[((b*H + h)*T + t)*src_w + src_off + c], h in order
// (the gradient of k_pe, which every head shares).
extern "C" __global__ void sum_heads(const float* src, int src_w, int src_off, float* dst, int width,
                                     int B, int T, int H) {
    FOR_EACH(i, (i64)B * T * width) {
        int c = (int)(i % width);
        i64 bt = i / width;
        int t = (int)(bt % T);
        int b = (int)(bt / T);
        float acc = 0.0f;
        for (int h = 0; h < H; ++h) acc += src[(((i64)b * H + h) * T + t) * src_w + src_off + c];
        dst[i] = acc;
    }
}

// In place on rows of T scores (one block per row; row index mod T is the query position):
// P = softmax(scale · S) over columns 0..=t, zero above the diagonal.
extern "C" __global__ void causal_softmax(float* s, int T, float scale) {
    i64 row = blockIdx.x;
    int t = (int)(row % T);
    float* r = s + row * T;
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) m = fmaxf(m, r[j] * scale);
    m = block_max(m);
    float sum = 0.0f;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) {
        float e = expf(r[j] * scale - m);
        r[j] = e;
        sum += e;
    }
    float inv = 1.0f / block_sum(sum);
    for (int j = threadIdx.x; j < T; j += blockDim.x) r[j] = j <= t ? r[j] * inv : 0.0f;
}

// In place on dP: dS = scale · P ⊙ (dP − rowsum(dP ⊙ P)), zero above the diagonal.
extern "C" __global__ void causal_softmax_bwd(const float* p, float* dp, int T, float scale) {
    i64 row = blockIdx.x;
    int t = (int)(row % T);
    const float* pr = p + row * T;
    float* d = dp + row * T;
    float dot = 0.0f;
    for (int j = threadIdx.x; j <= t; j += blockDim.x) dot += d[j] * pr[j];
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < T; j += blockDim.x) d[j] = j <= t ? scale * pr[j] * (d[j] - dot) : 0.0f;
}

// ---- the router (one thread per token; E ≤ 256, groups ≤ 64) ------------------------------------

// kernels.rs `router_forward`: sigmoid scores, bias-adjusted choice, groups scored by their top-2,
// the best `topk_group` groups kept, top-k (first index on ties), weights normalised and scaled.
extern "C" __global__ void router_fwd(const float* logits, const float* bias, int E, int K, int G, int TG,
                                      int norm, float scaling, float* scores, u32* topk, float* weights, i64 n) {
    FOR_EACH(t, n) {
        float choice[256];
        float gscore[64];
        int kept[64];
        const float* l = logits + t * E;
        float* s = scores + t * E;
        for (int i = 0; i < E; ++i) {
            float v = sigmoidf(l[i]);
            s[i] = v;
            choice[i] = v + bias[i];
        }
        int gsize = E / G;
        for (int g = 0; g < G; ++g) {
            float a = -INFINITY, b = -INFINITY;
            for (int i = g * gsize; i < (g + 1) * gsize; ++i) {
                float v = choice[i];
                if (v > a) {
                    b = a;
                    a = v;
                } else if (v > b) {
                    b = v;
                }
            }
            gscore[g] = gsize >= 2 ? a + b : a;
            kept[g] = 0;
        }
        for (int it = 0; it < TG; ++it) {
            int best = -1;
            for (int g = 0; g < G; ++g)
                if (!kept[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
            kept[best] = 1;
        }
        for (int i = 0; i < E; ++i)
            if (!kept[i / gsize]) choice[i] = 0.0f;
        u32* idx = topk + t * K;
        float* w = weights + t * K;
        for (int j = 0; j < K; ++j) {
            int best = -1;
            for (int i = 0; i < E; ++i) {
                bool used = false;
                for (int q = 0; q < j; ++q) used = used || idx[q] == (u32)i;
                if (!used && (best < 0 || choice[i] > choice[best])) best = i;
            }
            idx[j] = (u32)best;
        }
        float sum = 0.0f;
        for (int j = 0; j < K; ++j) {
            w[j] = s[idx[j]];
            sum += w[j];
        }
        float denom = sum + 1e-20f;
        for (int j = 0; j < K; ++j) w[j] = (norm ? w[j] / denom : w[j]) * scaling;
    }
}

// kernels.rs `router_backward`: dlogits of one token from the chosen experts' dweights.
extern "C" __global__ void router_bwd(const float* scores, const u32* topk, const float* dw, int E, int K,
                                      int norm, float scaling, float* dlogits, i64 n) {
    FOR_EACH(t, n) {
        const float* s = scores + t * E;
        const u32* idx = topk + t * K;
        const float* g = dw + t * K;
        float* d = dlogits + t * E;
        for (int i = 0; i < E; ++i) d[i] = 0.0f;
        if (norm) {
            float sum = 0.0f, dot = 0.0f;
            for (int j = 0; j < K; ++j) sum += s[idx[j]];
            sum += 1e-20f;
            for (int j = 0; j < K; ++j) dot += g[j] * s[idx[j]];
            for (int j = 0; j < K; ++j) {
                float sv = s[idx[j]];
                float ds = scaling * (g[j] / sum - dot / (sum * sum));
                d[idx[j]] += ds * sv * (1.0f - sv);
            }
        } else {
            for (int j = 0; j < K; ++j) {
                float sv = s[idx[j]];
                d[idx[j]] += scaling * g[j] * sv * (1.0f - sv);
            }
        }
    }
}

// out[r] = Σ_c x[r, c], in order (the balance loss's per-token score sums).
extern "C" __global__ void row_sums(const float* x, float* out, int cols, i64 rows) {
    FOR_EACH(r, rows) {
        float acc = 0.0f;
        for (int c = 0; c < cols; ++c) acc += x[r * cols + c];
        out[r] = acc;
    }
}

// Balance loss statistics of one sequence per block (kernels.rs `balance_loss`): for each expert,
// P_i = (1/T) Σ_t s[t,i]/denom[t] and f_i = E/(K T) · #{t : i chosen}; loss[b] = α Σ_i f_i P_i.
extern "C" __global__ void balance_stats(const float* scores, const float* denom, const u32* topk, int E,
                                         int K, int T, float alpha, float* f_out, float* loss_out) {
    int b = blockIdx.x;
    float part = 0.0f;
    for (int i = threadIdx.x; i < E; i += blockDim.x) {
        float p = 0.0f;
        int count = 0;
        for (int t = b * T; t < (b + 1) * T; ++t) {
            p += scores[(i64)t * E + i] / denom[t] / (float)T;
            for (int j = 0; j < K; ++j) count += topk[(i64)t * K + j] == (u32)i;
        }
        float f = (float)count * ((float)E / ((float)K * (float)T));
        f_out[(i64)b * E + i] = f;
        part += f * p;
    }
    part = block_sum(part);
    if (threadIdx.x == 0) loss_out[b] = alpha * part;
}

// The balance loss's logits gradient, one thread per token.
extern "C" __global__ void balance_grad(const float* scores, const float* denom, const float* f, int E, int T,
                                        float alpha, int n_seq, float* dlogits, i64 n) {
    FOR_EACH(t, n) {
        const float* s = scores + t * E;
        const float* fb = f + (t / T) * E;
        float dn = denom[t];
        float scale = alpha / ((float)T * (float)n_seq);
        float gs = 0.0f;
        for (int i = 0; i < E; ++i) gs += fb[i] * scale * s[i] / dn;
        for (int i = 0; i < E; ++i) {
            float ds = (fb[i] * scale - gs) / dn;
            dlogits[t * E + i] = ds * s[i] * (1.0f - s[i]);
        }
    }
}

// ---- cross-entropy (one block per row) ----------------------------------------------------------

// dlogits = gscale · (softmax − onehot) and loss_rows[r] = logsumexp − logit[target]; rows with a
// negative target get zeros.
extern "C" __global__ void cross_entropy(const float* logits, const i64* targets, int V, float gscale,
                                         float* dlogits, float* loss_rows) {
    i64 r = blockIdx.x;
    const float* x = logits + r * V;
    float* d = dlogits + r * V;
    i64 tgt = targets[r];
    if (tgt < 0) {
        for (int c = threadIdx.x; c < V; c += blockDim.x) d[c] = 0.0f;
        if (threadIdx.x == 0) loss_rows[r] = 0.0f;
        return;
    }
    float m = -INFINITY;
    for (int c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, x[c]);
    m = block_max(m);
    float s = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) s += expf(x[c] - m);
    s = block_sum(s);
    float inv = gscale / s;
    for (int c = threadIdx.x; c < V; c += blockDim.x) d[c] = expf(x[c] - m) * inv - (c == tgt ? gscale : 0.0f);
    if (threadIdx.x == 0) loss_rows[r] = logf(s) + m - x[tgt];
}
