// flash_bwd_common.cuh — what the backward kernels (flash_bwd.cu for sm80+,
// flash_bwd_hopper.cu for sm_90a, efficient_bwd.cu) share: their tensors,
// the delta preprocess, which key tile a CTA owns, which query tiles see it,
// and which pairs of tiles need element masks.
#pragma once
#include "flash_common.cuh"

// The backward's own tensors; strides in elements.
struct BwdParams {
    const void* dout;          // (total_q, heads, head_dim)
    float* dq_accum;           // float32, zeroed: (total_q, heads, head_dim) for flash_bwd.cu; by
                               // query-tile slot for flash_bwd_hopper.cu (DqAccum there)
    void* dk;                  // (total_k, heads_kv, head_dim) contiguous
    void* dv;
    float* delta;              // (heads, total_q), written by flash_bwd_delta
    const float* dlse;         // (heads, total_q) or null
    int* dq_turns;             // deterministic mode: per (head, query-tile slot) the key tiles that added to it, zeroed
    long long dout_row_stride, dout_head_stride;
    long long tiles_per_head;  // total_q / 64 + batch + 1: query-tile slots per head (query_tile_slot)
};

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

// The slot of query tile m_tile (64 rows) of sequence b among a head's
// tiles_per_head: each sequence starts at a 64-row boundary one slot past
// the last, so no two sequences share a slot, and the slots stay O(total_q).
__device__ __forceinline__ long long query_tile_slot(const SeqSpan& queries, int b, int m_tile) {
    return queries.start / 64 + b + m_tile;
}

// A CTA's key tile: keys [n0, n0 + BLOCK_N) of sequence b, key/value head h_kv.
struct KeyTile {
    int b, h_kv, n0;
    SeqSpan queries, keys;
    long long diagonal;  // key index on the diagonal of query 0
};

// flash_plan<BLOCK_N, true> laid the sequences' key tiles out in order; a CTA
// past the last tile has none.
template <int BLOCK_N>
__device__ __forceinline__ bool locate_key_tile(const AttnParams& p, const int* order, const int* tile_offsets,
                                                KeyTile& t) {
    t.h_kv = blockIdx.x % p.heads_kv;
    const int tile = blockIdx.x / p.heads_kv;
    if (tile >= tile_offsets[p.batch]) return false;
    int pos = 0;
    for (int hi = p.batch; hi - pos > 1;) {  // the last pos with tile_offsets[pos] <= tile
        const int mid = (pos + hi) / 2;
        if (tile_offsets[mid] <= tile) pos = mid; else hi = mid;
    }
    t.b = order[pos];
    t.n0 = (tile - tile_offsets[pos]) * BLOCK_N;
    t.queries = query_span(p, t.b);
    t.keys = key_span(p, t.b);
    t.diagonal = p.lower_right ? (long long)t.keys.len - t.queries.len : 0;
    return true;
}

// Whether the mask bounds key - query - diagonal from above (causal or a right window), and by what.
__device__ __forceinline__ bool right_bound(const AttnParams& p, long long& right) {
    right = p.causal ? (p.window_right >= 0 ? min(0, p.window_right) : 0) : p.window_right;
    return p.causal || p.window_right >= 0;
}

// The query tiles [first, end) of BLOCK_M rows whose rows may see keys [n0, n0 + BLOCK_N).
struct QueryTiles {
    int first, end;
};

template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ QueryTiles query_tiles(const AttnParams& p, int n0, int len_q, long long diagonal) {
    long long right;
    const bool bounded_right = right_bound(p, right);
    long long row_begin = 0, row_end = len_q;
    if (bounded_right) row_begin = max(row_begin, n0 - diagonal - right);
    if (p.window_left >= 0) row_end = min(row_end, n0 + BLOCK_N - 1 - diagonal + p.window_left + 1);
    const int first = (int)(row_begin / BLOCK_M);
    return {first, row_end > row_begin ? (int)((row_end + BLOCK_M - 1) / BLOCK_M) : first};
}

// Does the pair (keys [n0, n0 + BLOCK_N), queries [m0, m0 + BLOCK_M)) need
// element masks: does it cross a mask edge or the end of the keys or queries?
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool pair_crosses_edge(const AttnParams& p, const KeyTile& t, int n0, int m0) {
    long long right;
    const bool bounded_right = right_bound(p, right);
    return n0 + BLOCK_N > t.keys.len || m0 + BLOCK_M > t.queries.len
        || (bounded_right && (long long)n0 + BLOCK_N - 1 - m0 - t.diagonal > right)
        || (p.window_left >= 0 && (long long)n0 - (m0 + BLOCK_M - 1) - t.diagonal < -(long long)p.window_left);
}

// The queries [begin, end) of the tile's sequence that see key `key` (none
// past the keys' end): an interval, since every mask bounds key - query.
struct QueryRange {
    int begin, end;
    __device__ __forceinline__ bool contains(int query) const { return (query >= begin) & (query < end); }
};

__device__ __forceinline__ QueryRange visible_queries(const AttnParams& p, const KeyTile& t, int key) {
    if (key >= t.keys.len) return {0, 0};
    long long right, begin = 0, end = t.queries.len;
    if (right_bound(p, right)) begin = max(begin, key - t.diagonal - right);
    if (p.window_left >= 0) end = min(end, key - t.diagonal + p.window_left + 1);
    begin = min(begin, end);  // empty where the bounds cross
    return {(int)begin, (int)end};
}
