// epilogues.cuh — what the kernels write once a tile is done, from the
// accumulators in registers (block_ranges.cuh's layout): the forward's
// output rows and LSE, the backward's dK and dV, and its dQ additions.
#pragma once
#include "block_ranges.cuh"
#include "bwd_params.cuh"
#include "dtypes.cuh"
#include "mma.cuh"
#include "tma.cuh"

// One thread's two columns of each 8-column block j of row `row` (< 64) of
// a staging tile: 64-row atoms of 64 columns (128 bytes a row, 8 KB an
// atom), 128-byte swizzled as the copy engine reads them for tma_store
// (tma.cuh; the tile 1024-aligned): 16-byte chunk c of a row lies at chunk
// c ^ (row % 8). A warp's store (8 rows, one chunk each, 4 lanes a chunk)
// then covers the 32 banks once.
template <typename T, int D_BLOCKS>
__device__ __forceinline__ void stage_row(unsigned staging, int row, const float (&o)[D_BLOCKS * 4], int r,
                                          float inv_sum, int columns) {
    const int lane = threadIdx.x % 32;
    const unsigned at = staging + row * 128 + (lane % 4) * 4;
#pragma unroll
    for (int j = 0; j < D_BLOCKS; ++j)
        if (8 * j < columns) {
            const unsigned address = at + (j / 8) * 64 * 128 + (((j % 8) ^ (row % 8)) << 4);
            asm volatile("st.shared.b32 [%0], %1;\n"
                         :: "r"(address), "r"(pack2<T>(o[4 * j + 2 * r] * inv_sum, o[4 * j + 2 * r + 1] * inv_sum))
                         : "memory");
        }
}

// O * out_scale / l and lse = lse_scale * max + ln l for this thread's two
// rows (first_row and first_row + 8: query row / packed_heads of head t.h +
// row % packed_heads, FlashTile), in the first `columns` columns; rows past the sequence
// are not written, nor lse when the caller needs none (p.lse null).
// lse_scale: what turns the running max into scores (p.scale where the
// softmax folds the scale in). STAGED: O goes not to p.out but to the
// staging tile at shared-space address `staging` (stage_row) that holds the
// 64 rows from first_row - first_row % 64, for the caller to store with the
// copy engine.
template <typename T, int D_BLOCKS, bool STAGED = false>
__device__ __forceinline__ void write_rows(const AttnParams& p, const FlashTile& t, int first_row,
                                           const float (&o)[D_BLOCKS * 4], const float (&row_max)[2],
                                           float (&row_sum)[2], float lse_scale, float out_scale = 1.f,
                                           int columns = D_BLOCKS * 8, int packed_heads = 1, unsigned staging = 0) {
    const int lane = threadIdx.x % 32;
    float* lse = p.lse ? (float*)p.lse + t.h * p.total_q + t.queries.start : nullptr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int i = (first_row + 8 * r) / packed_heads, dh = (first_row + 8 * r) % packed_heads;
        if (i >= t.queries.len) continue;
        const float inv_sum = sum > 0.f ? out_scale / sum : 0.f;
        if constexpr (STAGED) {
            stage_row<T, D_BLOCKS>(staging, (first_row + 8 * r) % 64, o, r, inv_sum, columns);
        } else {
            T* out = (T*)p.out + (t.queries.start + i) * p.out_row_stride + (t.h + dh) * p.out_head_stride;
#pragma unroll
            for (int j = 0; j < D_BLOCKS; ++j)
                if (8 * j < columns) store2<T>(out + 8 * j + 2 * (lane % 4), o[4 * j + 2 * r] * inv_sum, o[4 * j + 2 * r + 1] * inv_sum);
        }
        if (lse && lane % 4 == 0) lse[dh * p.total_q + i] = sum > 0.f ? row_max[r] * lse_scale + __logf(sum) : neg_inf<float>();
    }
}

// dK * scale and dV of this thread's two key rows (first_key and first_key + 8
// of the sequence), columns col0 + 8 j + 2 (lane % 4) + {0, 1} below
// head_dim (the tensors' row length), once a key tile is done.
template <typename T, int D_BLOCKS>
__device__ __forceinline__ void store_dk_dv(const AttnParams& p, const BwdParams& g, const SeqSpan& keys, int h_kv,
                                            int first_key, long long head_dim, int col0,
                                            const float (&dk)[D_BLOCKS * 4], const float (&dv)[D_BLOCKS * 4],
                                            float scale) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = first_key + 8 * r;
        if (key >= keys.len) continue;
        const long long at = ((keys.start + key) * p.heads_kv + h_kv) * head_dim + col0;
#pragma unroll
        for (int j = 0; j < D_BLOCKS; ++j) {
            const int c = 8 * j + 2 * (lane % 4);
            if (col0 + c >= head_dim) continue;
            store2<T>((T*)g.dk + at + c, dk[4 * j + 2 * r] * scale, dk[4 * j + 2 * r + 1] * scale);
            store2<T>((T*)g.dv + at + c, dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
        }
    }
}

// Hand each pair of this thread's dQ elements (a warp's 16 rows x head_dim,
// mma layout), scaled, to add(address, x, y), in the first `rows` rows.
template <int D_BLOCKS, typename Add>
__device__ __forceinline__ void add_dq(const float (&dq)[D_BLOCKS * 4], float* dq_rows, long long row_stride, int rows,
                                       float scale, Add add) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = lane / 4 + 8 * r;
        if (row >= rows) continue;
#pragma unroll
        for (int j = 0; j < D_BLOCKS; ++j)
            add(dq_rows + row * row_stride + 8 * j + 2 * (lane % 4), dq[4 * j + 2 * r] * scale, dq[4 * j + 2 * r + 1] * scale);
    }
}

// A warp's dQ (16 rows, mma layout), scaled, added to the float32
// accumulator rows at dq_rows: on sm_90, staged in `staging` (16 rows of
// `pitch` floats; pitch = columns + 8 keeps the stores conflict-free) and
// added a row per copy-engine reduction; before, by atomics per element.
template <int D_BLOCKS>
__device__ __forceinline__ void add_dq_rows(const float (&dq)[D_BLOCKS * 4], float* dq_rows, long long row_stride,
                                            int rows, int columns, float scale, float* staging, int pitch) {
#if __CUDA_ARCH__ >= 900
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < D_BLOCKS; ++j)
            *(float2*)(staging + (lane / 4 + 8 * r) * pitch + 8 * j + 2 * (lane % 4)) =
                make_float2(dq[4 * j + 2 * r] * scale, dq[4 * j + 2 * r + 1] * scale);
    fence_proxy_async();
    __syncwarp();
    if (lane < 16 && columns > 0 && lane < rows)
        bulk_reduce_add_f32(dq_rows + lane * row_stride, smem_address(staging + lane * pitch), columns * 4);
#else
    // an atomic per element as it is scaled, not add_dq's pairs: holding both
    // of a pair across the first atomic made ptxas spill (efficient_bwd)
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = lane / 4 + 8 * r;
        if (row >= rows) continue;
#pragma unroll
        for (int j = 0; j < D_BLOCKS; ++j) {
            const int c = 8 * j + 2 * (lane % 4);
            if (c >= columns) continue;
            atomicAdd(dq_rows + row * row_stride + c, dq[4 * j + 2 * r] * scale);
            atomicAdd(dq_rows + row * row_stride + c + 1, dq[4 * j + 2 * r + 1] * scale);
        }
    }
#endif
}
