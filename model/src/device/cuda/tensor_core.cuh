// bf16 tensor-core helpers shared by flash.cu and gemm.cu (module.rs and flash.rs put this file
// in front of each): f32 to bf16 rounding, fragment loads and mma.sync m16n8k16.

typedef unsigned int u32;
typedef unsigned short u16;

// f32 to bf16, round to nearest even (the inputs are finite).
__device__ __forceinline__ u32 bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Two bf16 in one register, `lo` (the lower column or row index) in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

__device__ __forceinline__ u32 ld2(const u16* p) { return *(const u32*)p; }

// Two bf16 `stride` apart, the first in the low half (a fragment that runs down a column).
__device__ __forceinline__ u32 ld2_col(const u16* p, int stride) { return (u32)p[0] | ((u32)p[stride] << 16); }

// c (16×8, f32) += a (16×16, row-major fragment) · b (16×8, column-major fragment). With
// g = lane / 4 and t = lane % 4: a = {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)},
// b = {(k 2t.., n g), (k 2t+8.., n g)}, c = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The A fragment (rows g, g+8 of a 16-row strip; columns k0..k0+16) of a row-major bf16 tile.
__device__ __forceinline__ void frag_a(u32* a, const u16* tile, int ld, int g, int t, int k0) {
    const u16* r0 = tile + g * ld + k0 + 2 * t;
    const u16* r1 = r0 + 8 * ld;
    a[0] = ld2(r0);
    a[1] = ld2(r1);
    a[2] = ld2(r0 + 8);
    a[3] = ld2(r1 + 8);
}

// The A fragment over k = 16·kk.. made of two neighbouring 16×8 accumulators (n-tiles 2kk and
// 2kk+1): how a probability or score tile computed as C becomes the left operand of the next MMA.
__device__ __forceinline__ void c_to_a(u32* a, const float* lo, const float* hi) {
    a[0] = pack2(lo[0], lo[1]);
    a[1] = pack2(lo[2], lo[3]);
    a[2] = pack2(hi[0], hi[1]);
    a[3] = pack2(hi[2], hi[3]);
}
