// tile_products.cuh — the two products of the mma.sync forward kernels
// (flash_fwd.cu, decode.cu) on fp16/bf16 tiles in padded shared rows
// (tile_io.cuh): S = Q K^T and O += P V, a warp's M_SLICES m16 slices of
// rows at once, in block_ranges.cuh's register layout.
#pragma once
#include "mma.cuh"
#include "softmax.cuh"

// S = Q K^T over HEAD_DIM columns for N_BLOCKS 8-column blocks of keys.
// q_lane, k_lane: this lane's ldmatrix addresses in the Q and K tiles
// (shared space; slice ms's rows lie SLICE_BYTES further on per slice).
template <typename T, int M_SLICES, int N_BLOCKS, int HEAD_DIM, int ROW_BYTES, int SLICE_BYTES>
__device__ __forceinline__ void scores_qk(float (&s)[M_SLICES][N_BLOCKS * 4], unsigned q_lane, unsigned k_lane) {
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
        for (int e = 0; e < N_BLOCKS * 4; ++e) s[ms][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        unsigned a[M_SLICES][4];
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms) ldmatrix_x4(a[ms], q_lane + ms * SLICE_BYTES + kk * 32);
#pragma unroll
        for (int np = 0; np < N_BLOCKS / 2; ++np) {
            unsigned bk[4];
            ldmatrix_x4(bk, k_lane + np * 16 * ROW_BYTES + kk * 32);
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) {
                mma_16816<T>(&s[ms][8 * np], a[ms], bk[0], bk[1]);
                mma_16816<T>(&s[ms][8 * np + 4], a[ms], bk[2], bk[3]);
            }
        }
    }
}

// O += P V over the tile's N_BLOCKS * 8 keys, P taken from S's registers
// (the accumulator layout is P's A-fragment layout); v_lane: this lane's
// ldmatrix.trans address in the V tile.
template <typename T, int M_SLICES, int N_BLOCKS, int D_BLOCKS, int ROW_BYTES>
__device__ __forceinline__ void add_pv(float (&o)[M_SLICES][D_BLOCKS * 4], const float (&s)[M_SLICES][N_BLOCKS * 4],
                                       unsigned v_lane) {
#pragma unroll
    for (int kk = 0; kk < N_BLOCKS / 2; ++kk) {
        unsigned a[M_SLICES][4];
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms) p_fragment<T, N_BLOCKS>(s[ms], kk, a[ms]);
#pragma unroll
        for (int dp = 0; dp < D_BLOCKS / 2; ++dp) {
            unsigned bv[4];
            ldmatrix_x4_trans(bv, v_lane + kk * 16 * ROW_BYTES + dp * 32);
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) {
                mma_16816<T>(&o[ms][8 * dp], a[ms], bv[0], bv[1]);
                mma_16816<T>(&o[ms][8 * dp + 4], a[ms], bv[2], bv[3]);
            }
        }
    }
}
