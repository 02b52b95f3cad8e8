// A CPU stand-in for the CUDA features that flash.cu and gemm.cu use, so that their kernels'
// logic (indexing, masking, the online softmax, the tile loops) can be checked on a machine
// without a GPU (model/tests/kernel_sim.rs). Each CUDA thread of a block is a std::thread;
// __syncthreads and the warp-wide operations are barriers; mma.sync m16n8k16 is computed from
// its operands laid out as the PTX ISA documents them, and ldmatrix likewise. cp.async becomes a plain copy, so what
// this cannot see is a missing wait on a copy in flight.
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(x)
#define __align__(x) __attribute__((aligned(x)))

typedef unsigned int u32;

struct Dim3 {
    unsigned x, y, z;
};
thread_local Dim3 threadIdx{0, 0, 0};
Dim3 blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

constexpr int MAX_WARPS = 8;
std::barrier<>* g_block;
std::barrier<>* g_warp[MAX_WARPS];
float g_exchange[MAX_WARPS][32];
u32 g_a[MAX_WARPS][32][4], g_b[MAX_WARPS][32][2];
alignas(16) unsigned short g_smem[1 << 17];  // the dynamic shared memory

inline void __syncthreads() { g_block->arrive_and_wait(); }

template <typename T> T __shfl_xor_sync(unsigned, T v, int o) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    g_warp[w]->arrive_and_wait();
    g_exchange[w][l] = v;
    g_warp[w]->arrive_and_wait();
    T r = g_exchange[w][l ^ o];
    g_warp[w]->arrive_and_wait();
    return r;
}

inline u32 __float_as_uint(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

// f32 to bf16 bits, rounding to nearest even (the inputs are finite): pack2's cvt.rn.bf16x2.f32.
static inline u32 sim_bf16_bits(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

static inline float bf16_value(u32 h) {
    u32 u = (h & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// c += a · b for one warp: every lane hands in its fragments, every lane reads back its four
// accumulators. With g = lane / 4 and t = lane % 4: a = {(g, 2t..), (g+8, 2t..), (g, 2t+8..),
// (g+8, 2t+8..)}, b = {(k 2t.., n g), (k 2t+8.., n g)}, c = {(g, 2t), (g, 2t+1), (g+8, 2t),
// (g+8, 2t+1)}, each register's low half holding the lower index.
void sim_mma(float* c, const u32* a, u32 b0, u32 b1) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    g_warp[w]->arrive_and_wait();
    for (int i = 0; i < 4; ++i) g_a[w][l][i] = a[i];
    g_b[w][l][0] = b0;
    g_b[w][l][1] = b1;
    g_warp[w]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (int ln = 0; ln < 32; ++ln) {
        int g = ln >> 2, t = ln & 3;
        const u32* r = g_a[w][ln];
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = bf16_value(r[0] >> (16 * h));
            A[g + 8][2 * t + h] = bf16_value(r[1] >> (16 * h));
            A[g][2 * t + 8 + h] = bf16_value(r[2] >> (16 * h));
            A[g + 8][2 * t + 8 + h] = bf16_value(r[3] >> (16 * h));
            B[2 * t + h][g] = bf16_value(g_b[w][ln][0] >> (16 * h));
            B[2 * t + 8 + h][g] = bf16_value(g_b[w][ln][1] >> (16 * h));
        }
    }
    g_warp[w]->arrive_and_wait();
    int g = l >> 2, t = l & 3;
    for (int e = 0; e < 4; ++e) {
        int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float s = 0;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[e] += s;
    }
}

// ldmatrix .x4 (and .trans) for one warp: lanes 8i..8i+8 hand in the addresses of block i's
// rows; lane l reads back, per block, the pair the PTX ISA gives it (see tensor_core.cuh).
const unsigned short* g_rows[MAX_WARPS][32];
void sim_ldsm4(u32* r, const unsigned short* p, bool trans) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    g_warp[w]->arrive_and_wait();
    g_rows[w][l] = p;
    g_warp[w]->arrive_and_wait();
    for (int i = 0; i < 4; ++i) {
        if (trans) {
            const unsigned short* r0 = g_rows[w][8 * i + 2 * (l & 3)];
            const unsigned short* r1 = g_rows[w][8 * i + 2 * (l & 3) + 1];
            r[i] = (u32)r0[l >> 2] | ((u32)r1[l >> 2] << 16);
        } else {
            const unsigned short* row = g_rows[w][8 * i + (l >> 2)];
            r[i] = (u32)row[2 * (l & 3)] | ((u32)row[2 * (l & 3) + 1] << 16);
        }
    }
    g_warp[w]->arrive_and_wait();
}

struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint2 {
    u32 x, y;
};
struct uint4 {
    u32 x, y, z, w;
};
inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return {x, y, z, w}; }

// Runs `kernel` over a grid of (gx, gy) blocks of `threads` threads, one block at a time.
void launch(int gx, int gy, int threads, const std::function<void()>& kernel) {
    gridDim = {(unsigned)gx, (unsigned)gy, 1};
    blockDim = {(unsigned)threads, 1, 1};
    for (int y = 0; y < gy; ++y) {
        for (int x = 0; x < gx; ++x) {
            blockIdx = {(unsigned)x, (unsigned)y, 0};
            std::barrier<> block(threads);
            g_block = &block;
            std::vector<std::unique_ptr<std::barrier<>>> warps;
            for (int w = 0; w < threads / 32; ++w) {
                warps.emplace_back(new std::barrier<>(32));
                g_warp[w] = warps.back().get();
            }
            std::vector<std::thread> ts;
            for (int i = 0; i < threads; ++i)
                ts.emplace_back([i, &kernel] {
                    threadIdx = {(unsigned)i, 0, 0};
                    kernel();
                });
            for (auto& t : ts) t.join();
        }
    }
}

// Relative error ‖a − r‖ / ‖r‖ and the NaNs in `a`, printed as "name rel <e> nan <n>".
template <typename A, typename R> void report(const char* name, const A& a, const R& r) {
    double num = 0, den = 0;
    int nan = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (std::isnan(a[i])) ++nan;
        num += (a[i] - r[i]) * (a[i] - r[i]);
        den += r[i] * r[i];
    }
    printf("%s rel %.3e nan %d\n", name, den > 0 ? std::sqrt(num / den) : std::sqrt(num), nan);
}
