// tile_plan.cuh — the plan every tiled kernel (flash, efficient; forward and
// backward) works through: sequences ordered longest first and their tiles
// laid out in that order, on the device, and the lookup from a tile's index
// to its sequence.
#pragma once
#include "attn_params.cuh"
#include "varlen.cuh"

#define PLAN_THREADS 256
#define PLAN_BUCKETS 32

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The plan: sequences ordered by key length, longest first (a counting sort on
// floor(log2 Lk)), and their query tiles laid out in that order. order[pos] is
// the sequence processed pos-th, tile_offsets[pos] its first tile. The forward
// grid covers ceil(total_q / BLOCK_M) + batch tiles (an upper bound the host
// knows without a sync) times heads; CTAs past tile_offsets[batch] exit.

// A sequence's bucket by its key length: floor(log2) from the top, bucket 0 the longest.
__device__ __forceinline__ int length_bucket(int len) { return len > 1 ? __clz(len) : PLAN_BUCKETS - 1; }

// Inclusive prefix sum over the block; every thread must call it.
__device__ int block_inclusive_scan(int x, int* warp_totals) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int d = 1; d < 32; d *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) warp_totals[warp] = x;
    __syncthreads();
    for (int w = 0; w < warp; ++w) x += warp_totals[w];
    __syncthreads();
    return x;
}

// What a plan's tiles cover: query rows; key rows (the backward's CTAs own key
// tiles); or packed query rows, each query once per head of its key/value
// head's group (packed GQA: row r is query r / group, head r % group of it).
enum PlanRows { QUERY_ROWS, KEY_ROWS, PACKED_QUERY_ROWS };

// The plan of `batch` sequences, by one block of PLAN_THREADS threads (all
// of them call it): sequences ordered by key_length(b), longest first, and
// tiles_of(b) tiles for sequence b laid out in that order.
template <typename KeyLength, typename TilesOf>
__device__ __forceinline__ void plan_tiles(int batch, int* order, int* tile_offsets, KeyLength key_length,
                                           TilesOf tiles_of) {
    __shared__ int bucket_next[PLAN_BUCKETS];
    __shared__ int warp_totals[PLAN_THREADS / 32];
    __shared__ int chunk_total;
    if (threadIdx.x < PLAN_BUCKETS) bucket_next[threadIdx.x] = 0;
    __syncthreads();
    for (int b = threadIdx.x; b < batch; b += PLAN_THREADS) atomicAdd(&bucket_next[length_bucket(key_length(b))], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int at = 0;
        for (int i = 0; i < PLAN_BUCKETS; ++i) {
            const int count = bucket_next[i];
            bucket_next[i] = at;
            at += count;
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < batch; b += PLAN_THREADS)
        order[atomicAdd(&bucket_next[length_bucket(key_length(b))], 1)] = b;
    __syncthreads();

    int carried = 0;
    if (threadIdx.x == 0) tile_offsets[0] = 0;
    for (int first = 0; first < batch; first += PLAN_THREADS) {
        const int pos = first + threadIdx.x;
        const int tiles = pos < batch ? tiles_of(order[pos]) : 0;
        const int inclusive = block_inclusive_scan(tiles, warp_totals);
        if (pos < batch) tile_offsets[pos + 1] = carried + inclusive;
        if (threadIdx.x == PLAN_THREADS - 1) chunk_total = inclusive;
        __syncthreads();
        carried += chunk_total;
        __syncthreads();
    }
}

template <int BLOCK_M, PlanRows ROWS = QUERY_ROWS>
__global__ void __launch_bounds__(PLAN_THREADS) flash_plan(const AttnParams p, int* order, int* tile_offsets) {
    plan_tiles(p.batch, order, tile_offsets, [&](int b) { return key_span(p, b).len; }, [&](int b) {
        int rows = ROWS == KEY_ROWS ? key_span(p, b).len : query_span(p, b).len;
        if (ROWS == PACKED_QUERY_ROWS) rows *= p.heads / p.heads_kv;
        return ceil_div(rows, BLOCK_M);
    });
}

// The position in the plan of the sequence that tile `tile` (< tile_offsets[batch]) belongs to.
__device__ __forceinline__ int plan_position(const AttnParams& p, const int* tile_offsets, int tile) {
    int pos = 0;
    for (int hi = p.batch; hi - pos > 1;) {  // the last pos with tile_offsets[pos] <= tile
        const int mid = (pos + hi) / 2;
        if (tile_offsets[mid] <= tile) pos = mid; else hi = mid;
    }
    return pos;
}
