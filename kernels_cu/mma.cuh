// mma.cuh — thin wrappers over the sm80+ instructions the tensor-core kernels
// use: cp.async (global -> shared, 16 bytes, zero-filled when out of range),
// ldmatrix (shared -> mma fragments), mma.sync m16n8k16 on 16-bit inputs and
// m16n8k8 on TF32, both with fp32 accumulators.
#pragma once
#include "dtypes.cuh"

__device__ __forceinline__ unsigned smem_address(const void* pointer) {
    return (unsigned)__cvta_generic_to_shared(pointer);
}

// 16 bytes from global to shared; when !valid the destination is zero-filled
// and nothing is read.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_address(shared)), "l"(global), "r"(valid ? 16 : 0));
}
// 4 bytes from global to shared (through L1: .ca is the only kind this small).
__device__ __forceinline__ void cp_async_4(void* shared, const void* global) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" :: "r"(smem_address(shared)), "l"(global));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING)); }

// Four 8x8 matrices of 16-bit elements; lane l gives the shared-space address
// (smem_address) of row (l % 8) of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// D = A (16x16, row) * B (16x8, col) + D, fp32 accumulators d[0..3].
template <typename T> __device__ __forceinline__ void mma_16816(float* d, const unsigned (&a)[4],
                                                                 unsigned b0, unsigned b1);
// Two floats as two 16-bit values in one register, the first in the low half.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);

// One definition for both 16-bit types: PTX spells the type in the opcode.
#define DEFINE_FOR_16BIT(TYPE, PTX)                                                               \
    template <> __device__ __forceinline__ void mma_16816<TYPE>(float* d, const unsigned (&a)[4], \
                                                                 unsigned b0, unsigned b1) {      \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX ".f32 "                 \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"          \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));            \
    }                                                                                            \
    template <> __device__ __forceinline__ unsigned pack2<TYPE>(float lo, float hi) {            \
        unsigned r;                                                                              \
        asm("cvt.rn." PTX "x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));                   \
        return r;                                                                                \
    }
DEFINE_FOR_16BIT(half_t, "f16")
DEFINE_FOR_16BIT(bf16_t, "bf16")
#undef DEFINE_FOR_16BIT

// Two floats stored to consecutive elements (8-byte aligned for float).
template <typename T> __device__ __forceinline__ void store2(T* at, float lo, float hi) { *(unsigned*)at = pack2<T>(lo, hi); }
template <> __device__ __forceinline__ void store2<float>(float* at, float lo, float hi) { *(float2*)at = make_float2(lo, hi); }

// D = A (16x8, row) * B (8x8, col) + D on TF32 inputs (fp32 bit patterns
// rounded by to_tf32), fp32 accumulators d[0..3].
__device__ __forceinline__ void mma_1688_tf32(float* d, const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

// D (16 x 16 as two m16n8 accumulators, d[0..7]) += A (16 x 16) B (16 x 16),
// B as the four registers of one ldmatrix_x4 (two 16 x 8 halves).
template <typename T>
__device__ __forceinline__ void mma_16x16(float* d, const unsigned (&a)[4], const unsigned (&b)[4]) {
    mma_16816<T>(d, a, b[0], b[1]);
    mma_16816<T>(d + 4, a, b[2], b[3]);
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
