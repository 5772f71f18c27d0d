// operands.cuh — tensor-core operands for every storage type behind one
// interface, so that the efficient kernels are written once for fp16, bf16
// and fp32.
//
// Products are built from m16n8 blocks with fp32 accumulators in mma.sync's
// layout (block_ranges.cuh: a thread holds rows g = lane / 4 and g + 8 and
// columns 2t and 2t + 1, t = lane % 4, of each 8-column block). An A operand
// covers 16 rows x K_STEP, a B operand 16 columns (two blocks) x K_STEP. Tiles
// in shared memory are row-major, rows padded by 16 bytes (PaddedRows), and
// come four ways:
//   a_rows: A from a tile whose rows are A's rows (Q, K, V);
//   a_cols: A from a tile whose rows are A's k (dS^T read as dS);
//   b_rows: B from a tile whose rows are B's columns (K in Q K^T);
//   b_cols: B from a tile whose rows are B's k (V in P V);
// and a_acc takes A from an accumulator of 16 rows (P, P^T, dS^T). Each
// load starts from its lane's address in the tile (a_rows_lane for a_rows
// and so on), computed once, plus an offset that unrolled loops make constant.
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
    using B = A;            // both: the four registers of one ldmatrix x4
    using Lane = unsigned;  // this lane's ldmatrix row address (shared space)

    // Lane addresses, computed once per tile; the loads add constant offsets.
    static __device__ __forceinline__ Lane a_rows_lane(const T* tile, int pitch) {
        const int lane = threadIdx.x % 32;
        return smem_address(tile + (lane % 16) * pitch + (lane / 16) * 8);
    }
    static __device__ __forceinline__ Lane a_cols_lane(const T* tile, int pitch) {
        const int lane = threadIdx.x % 32;
        return smem_address(tile + (lane % 8 + (lane / 16) * 8) * pitch + ((lane / 8) % 2) * 8);
    }
    static __device__ __forceinline__ Lane b_rows_lane(const T* tile, int pitch) { return a_cols_lane(tile, pitch); }
    static __device__ __forceinline__ Lane b_cols_lane(const T* tile, int pitch) {
        const int lane = threadIdx.x % 32;
        return smem_address(tile + (lane % 8 + ((lane / 8) % 2) * 8) * pitch + (lane / 16) * 8);
    }

    // Four 8x8 blocks from (row, col) of the tile on, as ldmatrix lays them out.
    template <bool TRANSPOSED>
    static __device__ __forceinline__ A load(Lane lane, int pitch, int row, int col) {
        A a;
        if (TRANSPOSED) ldmatrix_x4_trans(a.r, lane + (row * pitch + col) * 2);
        else ldmatrix_x4(a.r, lane + (row * pitch + col) * 2);
        return a;
    }
    static __device__ __forceinline__ A a_rows(Lane lane, int pitch, int row0, int k0) {
        return load<false>(lane, pitch, row0, k0);
    }
    static __device__ __forceinline__ A a_cols(Lane lane, int pitch, int k0, int col0) {
        return load<true>(lane, pitch, k0, col0);
    }
    static __device__ __forceinline__ B b_rows(Lane lane, int pitch, int n0, int k0) {
        return load<false>(lane, pitch, n0, k0);
    }
    static __device__ __forceinline__ B b_cols(Lane lane, int pitch, int k0, int n0) {
        return load<true>(lane, pitch, k0, n0);
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
    using Lane = const float*;  // this lane's first element

    static __device__ __forceinline__ Lane a_rows_lane(const float* tile, int pitch) {  // element (g, t)
        return tile + (threadIdx.x % 32 / 4) * pitch + threadIdx.x % 4;
    }
    static __device__ __forceinline__ Lane a_cols_lane(const float* tile, int pitch) {  // element (2t, g)
        return tile + 2 * (threadIdx.x % 4) * pitch + threadIdx.x % 32 / 4;
    }
    static __device__ __forceinline__ Lane b_rows_lane(const float* tile, int pitch) { return a_rows_lane(tile, pitch); }
    static __device__ __forceinline__ Lane b_cols_lane(const float* tile, int pitch) { return a_cols_lane(tile, pitch); }

    static __device__ __forceinline__ void split(float x, unsigned& head, unsigned& tail) {
        head = to_tf32(x);
        tail = PASSES == 3 ? to_tf32(x - __uint_as_float(head)) : 0u;
    }
    template <typename Op>
    static __device__ __forceinline__ Op make(float x0, float x1, float x2, float x3) {
        Op op;
        split(x0, op.head[0], op.tail[0]);
        split(x1, op.head[1], op.tail[1]);
        split(x2, op.head[2], op.tail[2]);
        split(x3, op.head[3], op.tail[3]);
        return op;
    }
    static __device__ __forceinline__ A a_rows(Lane lane, int pitch, int row0, int k0) {
        const float* at = lane + row0 * pitch + k0;
        return make<A>(at[0], at[8 * pitch], at[4], at[8 * pitch + 4]);
    }
    static __device__ __forceinline__ A a_cols(Lane lane, int pitch, int k0, int col0) {
        const float* at = lane + k0 * pitch + col0;
        return make<A>(at[0], at[8], at[pitch], at[pitch + 8]);
    }
    static __device__ __forceinline__ B b_rows(Lane lane, int pitch, int n0, int k0) {
        const float* at = lane + n0 * pitch + k0;
        return make<B>(at[0], at[4], at[8 * pitch], at[8 * pitch + 4]);
    }
    static __device__ __forceinline__ B b_cols(Lane lane, int pitch, int k0, int n0) {
        const float* at = lane + k0 * pitch + n0;
        return make<B>(at[0], at[pitch], at[8], at[pitch + 8]);
    }
    // Columns [8 block, 8 block + 8) of a 16-row accumulator, k permuted.
    static __device__ __forceinline__ A a_acc(const float* acc, int block) {
        const float* c = acc + 4 * block;
        return make<A>(c[0], c[2], c[1], c[3]);
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
