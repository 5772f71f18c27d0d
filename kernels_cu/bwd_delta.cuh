// bwd_delta.cuh — the backward's preprocess kernel, shared by the flash and
// efficient backward families.
#pragma once
#include "attn_params.cuh"
#include "bwd_params.cuh"
#include "dtypes.cuh"

// The preprocess: delta = rowsum(dO * O) - dLSE per query row and head (dLSE:
// the gradient reaching the returned lse, if any); one warp per row, 16 bytes
// per lane and load, head_dim_v up to 256.
#define DELTA_THREADS 256

template <typename T>
__device__ __forceinline__ float dot_chunk(const uint4& x, const uint4& y) {
    const T* a = (const T*)&x;
    const T* b = (const T*)&y;
    float sum = 0.f;
#pragma unroll
    for (int e = 0; e < 16 / (int)sizeof(T); ++e) sum = fmaf(to_acc(a[e]), to_acc(b[e]), sum);
    return sum;
}

template <typename T>
__global__ void __launch_bounds__(DELTA_THREADS) flash_bwd_delta(const AttnParams p, const BwdParams g) {
    constexpr int CHUNK = 16 / sizeof(T);              // elements per load
    constexpr int COLUMN_PASSES = 256 / (32 * CHUNK);  // loads per lane and head
    constexpr int HEADS_AT_ONCE = 4;                   // heads in flight per lane before the sums
    const long long row = (long long)blockIdx.x * (DELTA_THREADS / 32) + threadIdx.x / 32;
    if (row >= p.total_q) return;
    const int lane = threadIdx.x % 32;
    const T* dout = (const T*)g.dout + row * g.dout_row_stride + CHUNK * lane;
    const T* out = (const T*)p.out + row * p.out_row_stride + CHUNK * lane;
    for (int h0 = 0; h0 < p.heads; h0 += HEADS_AT_ONCE) {
        uint4 x[HEADS_AT_ONCE][COLUMN_PASSES], y[HEADS_AT_ONCE][COLUMN_PASSES];
#pragma unroll
        for (int u = 0; u < HEADS_AT_ONCE; ++u)
#pragma unroll
            for (int c = 0; c < COLUMN_PASSES; ++c) {
                const int column = CHUNK * (32 * c + lane);
                const bool load = column < p.head_dim_v && h0 + u < p.heads;
                x[u][c] = load ? *(const uint4*)(dout + (h0 + u) * g.dout_head_stride + 32 * CHUNK * c) : make_uint4(0, 0, 0, 0);
                y[u][c] = load ? *(const uint4*)(out + (h0 + u) * p.out_head_stride + 32 * CHUNK * c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int u = 0; u < HEADS_AT_ONCE; ++u) {
            float sum = 0.f;
#pragma unroll
            for (int c = 0; c < COLUMN_PASSES; ++c) sum += dot_chunk<T>(x[u][c], y[u][c]);
            for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
            const long long at = (h0 + u) * p.total_q + row;
            if (lane == 0 && h0 + u < p.heads) g.delta[at] = g.dlse == nullptr ? sum : sum - g.dlse[at];
        }
    }
}
