// operands.cuh — tensor-core operands for every storage type behind one
// interface, so that the efficient kernels are written once for fp16, bf16
// and fp32.
//
// Products are built from m16n8 blocks with fp32 accumulators in mma.sync's
// layout (flash_common.cuh: a thread holds rows g = lane / 4 and g + 8 and
// columns 2t and 2t + 1, t = lane % 4, of each 8-column block). An A operand
// covers 16 rows x K_STEP, a B operand 16 columns (two blocks) x K_STEP. Tiles
// in shared memory are row-major, rows padded by 16 bytes (PaddedRows), and
// come four ways:
//   a_rows: A from a tile whose rows are A's rows (Q, K, V);
//   a_cols: A from a tile whose rows are A's k (dS^T read as dS);
//   b_rows: B from a tile whose rows are B's columns (K in Q K^T);
//   b_cols: B from a tile whose rows are B's k (V in P V);
// and a_acc takes A from an accumulator of 16 rows (P, P^T, dS^T).
//
// fp16 / bf16 (Operands<T, 1>): K_STEP 16, ldmatrix x4, mma m16n8k16.
// fp32 (Operands<float, PASSES>): K_STEP 8, mma m16n8k8 on TF32. PASSES 3
//   splits each value into a TF32 head and the TF32 rounding of the rest and
//   adds head*head + head*tail + tail*head: about 2^-21 relative error per
//   product, fp32 accuracy. PASSES 1 is plain TF32 (allow_tf32). ldmatrix
//   cannot transpose 32-bit elements, so operands are read with LDS, and
//   where a product's k runs along a tile's rows (a_cols, b_cols) or along an
//   accumulator's columns (a_acc) the k index is permuted, slot t holding
//   k = 2t and slot t + 4 holding 2t + 1, on both operands of that product:
//   a thread's two accumulator columns are then its own A elements, and with
//   pitches of 4 mod 32 words every LDS is free of bank conflicts. Products
//   pair a_rows with b_rows and a_cols / a_acc with b_cols, so the
//   permutation always meets itself.
#pragma once
#include "mma.cuh"

template <typename T, int PASSES>
struct Operands {
    static_assert(sizeof(T) == 2 && PASSES == 1, "16-bit storage: one pass");
    static constexpr int K_STEP = 16;
    struct A { unsigned r[4]; };
    struct B { unsigned r[4]; };

    static __device__ __forceinline__ A a_rows(const T* tile, int pitch, int row0, int k0) {
        const int lane = threadIdx.x % 32;
        A a;
        ldmatrix_x4(a.r, smem_address(tile + (row0 + lane % 16) * pitch + k0 + (lane / 16) * 8));
        return a;
    }
    static __device__ __forceinline__ A a_cols(const T* tile, int pitch, int k0, int col0) {
        const int lane = threadIdx.x % 32;
        A a;
        ldmatrix_x4_trans(a.r, smem_address(tile + (k0 + lane % 8 + (lane / 16) * 8) * pitch + col0 + ((lane / 8) % 2) * 8));
        return a;
    }
    static __device__ __forceinline__ B b_rows(const T* tile, int pitch, int n0, int k0) {
        const int lane = threadIdx.x % 32;
        B b;
        ldmatrix_x4(b.r, smem_address(tile + (n0 + lane % 8 + (lane / 16) * 8) * pitch + k0 + ((lane / 8) % 2) * 8));
        return b;
    }
    static __device__ __forceinline__ B b_cols(const T* tile, int pitch, int k0, int n0) {
        const int lane = threadIdx.x % 32;
        B b;
        ldmatrix_x4_trans(b.r, smem_address(tile + (k0 + lane % 8 + ((lane / 8) % 2) * 8) * pitch + n0 + (lane / 16) * 8));
        return b;
    }
    // Columns [8 block, 8 block + 16) of a 16-row accumulator.
    static __device__ __forceinline__ A a_acc(const float* acc, int block) {
        const float* c = acc + 4 * block;
        return {{pack2<T>(c[0], c[1]), pack2<T>(c[2], c[3]), pack2<T>(c[4], c[5]), pack2<T>(c[6], c[7])}};
    }
    // d[0..7]: the two 8-column blocks of B.
    static __device__ __forceinline__ void mma(float* d, const A& a, const B& b) {
        mma_16816<T>(d, a.r, b.r[0], b.r[1]);
        mma_16816<T>(d + 4, a.r, b.r[2], b.r[3]);
    }
};

template <int PASSES>
struct Operands<float, PASSES> {
    static_assert(PASSES == 1 || PASSES == 3, "plain TF32 or split TF32");
    static constexpr int K_STEP = 8;
    struct A { unsigned head[4], tail[4]; };
    struct B { unsigned head[4], tail[4]; };  // [2 block + {0, 1}]

    static __device__ __forceinline__ void split(float x, unsigned& head, unsigned& tail) {
        head = to_tf32(x);
        tail = PASSES == 3 ? to_tf32(x - __uint_as_float(head)) : 0u;
    }
    template <typename Op>
    static __device__ __forceinline__ Op make(const float (&x)[4]) {
        Op op;
#pragma unroll
        for (int e = 0; e < 4; ++e) split(x[e], op.head[e], op.tail[e]);
        return op;
    }
    static __device__ __forceinline__ A a_rows(const float* tile, int pitch, int row0, int k0) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
        const float* at = tile + (row0 + g) * pitch + k0 + t;
        return make<A>({at[0], at[8 * pitch], at[4], at[8 * pitch + 4]});
    }
    static __device__ __forceinline__ A a_cols(const float* tile, int pitch, int k0, int col0) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
        const float* at = tile + (k0 + 2 * t) * pitch + col0 + g;
        return make<A>({at[0], at[8], at[pitch], at[pitch + 8]});
    }
    static __device__ __forceinline__ B b_rows(const float* tile, int pitch, int n0, int k0) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
        const float* at = tile + (n0 + g) * pitch + k0 + t;
        return make<B>({at[0], at[4], at[8 * pitch], at[8 * pitch + 4]});
    }
    static __device__ __forceinline__ B b_cols(const float* tile, int pitch, int k0, int n0) {
        const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
        const float* at = tile + (k0 + 2 * t) * pitch + n0 + g;
        return make<B>({at[0], at[pitch], at[8], at[pitch + 8]});
    }
    // Columns [8 block, 8 block + 8) of a 16-row accumulator, k permuted.
    static __device__ __forceinline__ A a_acc(const float* acc, int block) {
        const float* c = acc + 4 * block;
        return make<A>({c[0], c[2], c[1], c[3]});
    }
    static __device__ __forceinline__ void mma(float* d, const A& a, const B& b) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            if (PASSES == 3) {
                mma_1688_tf32(d + 4 * n, a.tail, b.head[2 * n], b.head[2 * n + 1]);
                mma_1688_tf32(d + 4 * n, a.head, b.tail[2 * n], b.tail[2 * n + 1]);
            }
            mma_1688_tf32(d + 4 * n, a.head, b.head[2 * n], b.head[2 * n + 1]);
        }
    }
};
