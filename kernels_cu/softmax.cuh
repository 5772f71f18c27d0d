// softmax.cuh — the online softmax's row state (running max and sum) on one
// thread's part of a score tile (block_ranges.cuh's register layout), P as
// an A operand of the next product, and the backward's row state (lse and
// delta) staged for its tiles.
#pragma once
#include "dtypes.cuh"
#include "mma.cuh"

#define LOG2_E 1.4426950408889634f

// O = 0, and row max and sum as before any key, for every m16 slice of a thread's rows.
template <int M_SLICES, int O_ELEMENTS>
__device__ __forceinline__ void start_rows(float (&o)[M_SLICES][O_ELEMENTS], float (&row_max)[M_SLICES][2],
                                           float (&row_sum)[M_SLICES][2]) {
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms) {
#pragma unroll
        for (int e = 0; e < O_ELEMENTS; ++e) o[ms][e] = 0.f;
        row_max[ms][0] = row_max[ms][1] = neg_inf<float>();
        row_sum[ms][0] = row_sum[ms][1] = 0.f;
    }
}

// Online softmax over one score tile for this thread's two rows: the new row
// max (over the 4 lanes sharing a row), the row sums, S replaced by
// P = 2^(scale log2(e) (S - max)) (one FFMA and one exp2 per score; scale > 0,
// so the max of S gives the max of scale * S), and the factor by which O's
// rows must shrink (rescale_rows) before P V is added.
template <int N_BLOCKS>
__device__ __forceinline__ void softmax_scores(float (&s)[N_BLOCKS * 4], float (&row_max)[2], float (&row_sum)[2],
                                               float scale_log2, float (&rescale)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float m = row_max[r];
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j) m = fmaxf(m, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float base = m == neg_inf<float>() ? 0.f : m * scale_log2;  // a row that has seen nothing yet
        rescale[r] = fast_exp2(row_max[r] * scale_log2 - base);
        row_max[r] = m;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float& x = s[4 * j + 2 * r + c];
                x = fast_exp2(fmaf(x, scale_log2, -base));
                sum += x;
            }
        row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
}

template <int D_BLOCKS>
__device__ __forceinline__ void rescale_rows(float (&o)[D_BLOCKS * 4], const float (&rescale)[2]) {
#pragma unroll
    for (int j = 0; j < D_BLOCKS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * j + e] *= rescale[e / 2];
}

// P's keys [16 k, 16 k + 16) as an A operand (mma.sync m16k16 layout).
template <typename T, int N_BLOCKS>
__device__ __forceinline__ void p_fragment(const float (&s)[N_BLOCKS * 4], int k, unsigned (&a)[4]) {
    a[0] = pack2<T>(s[8 * k], s[8 * k + 1]);
    a[1] = pack2<T>(s[8 * k + 2], s[8 * k + 3]);
    a[2] = pack2<T>(s[8 * k + 4], s[8 * k + 5]);
    a[3] = pack2<T>(s[8 * k + 6], s[8 * k + 7]);
}

// lse (log2-scaled) and delta of the query rows [m0, m0 + ROWS) into shared
// memory, a thread a row. A row past the end, or one that sees no key, gets
// lse +inf, so that its P = exp2(S - lse) is 0.
template <int ROWS>
__device__ __forceinline__ void stage_lse_delta(float* lse_tile, float* delta_tile, const float* lse, const float* delta,
                                                int m0, int len_q) {
    if (threadIdx.x < ROWS) {
        const int i = m0 + threadIdx.x;
        const float l = i < len_q ? lse[i] : neg_inf<float>();
        lse_tile[threadIdx.x] = l == neg_inf<float>() ? -neg_inf<float>() : l * LOG2_E;
        delta_tile[threadIdx.x] = i < len_q ? delta[i] : 0.f;
    }
}
