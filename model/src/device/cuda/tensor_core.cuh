// bf16 tensor-core helpers shared by flash.cu and gemm.cu (module.rs and flash.rs put this file
// in front of each): f32 to bf16 rounding, fragment loads, mma.sync m16n8k16 and cp.async.

typedef unsigned int u32;
typedef unsigned short u16;

// Two bf16 in one register, `lo` (the lower column or row index) in the low half: one cvt
// instruction, rounding to nearest even.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 ld2(const u16* p) { return *(const u32*)p; }

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

// A generic pointer into shared memory as the 32-bit address that ldmatrix and cp.async take.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes from global to shared memory without passing through registers (cp.async), and
// the waits for them. cp16z copies `bytes` (0 or 16) and fills the rest with zeros.
__device__ __forceinline__ void cp16(void* smem, const void* global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(global));
}
__device__ __forceinline__ void cp16z(void* smem, const void* global, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(global), "r"(bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `N` committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8 × 8 bf16 blocks from shared memory (ldmatrix .x4): lanes 8i..8i+8 give the addresses
// of block i's eight rows (16 bytes each, 16-byte aligned); r[i] then holds, in lane l, block
// i's elements (l / 4, 2(l % 4)) and (l / 4, 2(l % 4) + 1), low half first.
__device__ __forceinline__ void ldsm4(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// ldsm4 of the transposed blocks: lane l gets elements (2(l % 4), l / 4) and (2(l % 4) + 1, l / 4).
__device__ __forceinline__ void ldsm4_t(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// The A fragment over k = 16·kk.. made of two neighbouring 16×8 accumulators (n-tiles 2kk and
// 2kk+1): how a probability or score tile computed as C becomes the left operand of the next MMA.
__device__ __forceinline__ void c_to_a(u32* a, const float* lo, const float* hi) {
    a[0] = pack2(lo[0], lo[1]);
    a[1] = pack2(lo[2], lo[3]);
    a[2] = pack2(hi[0], hi[1]);
    a[3] = pack2(hi[2], hi[3]);
}
