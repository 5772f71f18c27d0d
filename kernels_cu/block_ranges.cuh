// block_ranges.cuh — which blocks of keys a query tile visits and which
// blocks of queries see a key tile (one right bound of the mask for both),
// which tiles or pairs of tiles need element masks, and those masks.
//
// Register layout of a score tile: a thread holds, for each 16-row slice, two
// rows (lane / 4 and lane / 4 + 8) and, per 8-column block j, two columns
// (8 j + 2 (lane % 4) + {0, 1}): element [4 j + 2 r + c] (mma.sync's m16n8
// and wgmma's m64nN accumulators).
#pragma once
#include "dtypes.cuh"
#include "tile_plan.cuh"

// Whether the mask bounds key - query - diagonal from above (causal or a right window), and by what.
__device__ __forceinline__ bool right_bound(const AttnParams& p, long long& right) {
    right = p.causal ? (p.window_right >= 0 ? min(0, p.window_right) : 0) : p.window_right;
    return p.causal || p.window_right >= 0;
}

// One work item of the plan: rows [m0, m0 + BLOCK_M) of sequence b, head h,
// and the key tiles [first_tile, end_tile) some of its rows may see. A row
// is a query, or with packed GQA (PACKED_QUERY_ROWS) query row / G of head
// h + row % G, h the first of key/value head h_kv's G query heads.
struct FlashTile {
    int b, h, h_kv, m0;
    int first_query, last_row;    // the tile's first query, and its last one that exists
    SeqSpan queries, keys;
    long long diagonal;           // key index on the diagonal of query 0
    bool bounded_right;
    long long right;              // largest key - query - diagonal seen, when bounded_right
    int first_tile, end_tile;
};

// G when a tile's rows are packed, else 1.
template <bool PACKED>
__device__ __forceinline__ int packed_heads(const AttnParams& p) { return PACKED ? p.heads / p.heads_kv : 1; }

// t's diagonal, right bound and the key tiles [first_tile, end_tile) of
// BLOCK_N keys that its queries [first_query, last_row] may see, from its
// spans.
template <int BLOCK_N>
__device__ __forceinline__ void bound_keys(const AttnParams& p, FlashTile& t) {
    t.diagonal = p.lower_right ? (long long)t.keys.len - t.queries.len : 0;
    t.bounded_right = right_bound(p, t.right);
    long long key_end = t.keys.len, key_begin = 0;
    if (t.bounded_right) key_end = min(key_end, max(0LL, t.last_row + t.diagonal + t.right + 1));
    if (p.window_left >= 0) key_begin = max(0LL, t.first_query + t.diagonal - p.window_left);
    t.first_tile = (int)(key_begin / BLOCK_N);
    t.end_tile = key_end > key_begin ? ceil_div((int)key_end, BLOCK_N) : t.first_tile;
}

template <int BLOCK_M, int BLOCK_N, bool PACKED = false>
__device__ __forceinline__ bool locate_tile(const AttnParams& p, const int* order, const int* tile_offsets, int work,
                                            FlashTile& t) {
    const int group = packed_heads<PACKED>(p), heads = PACKED ? p.heads_kv : p.heads;
    const int head = work % heads, tile = work / heads;
    if (tile >= tile_offsets[p.batch]) return false;
    const int pos = plan_position(p, tile_offsets, tile);
    t.b = order[pos];
    t.m0 = (tile_offsets[pos + 1] - 1 - tile) * BLOCK_M;  // a sequence's costliest (last) tile first
    t.h_kv = PACKED ? head : head / (p.heads / p.heads_kv);
    t.h = PACKED ? head * group : head;
    t.queries = query_span(p, t.b);
    t.keys = key_span(p, t.b);
    t.first_query = t.m0 / group;
    t.last_row = (min(t.m0 + BLOCK_M, t.queries.len * group) - 1) / group;
    bound_keys<BLOCK_N>(p, t);
    return true;
}

// Does key tile [n0, n0 + BLOCK_N) need element masks (it crosses a mask edge
// or the end of the keys)? Interior tiles skip them.
template <int BLOCK_N>
__device__ __forceinline__ bool crosses_edge(const AttnParams& p, const FlashTile& t, int n0) {
    return n0 + BLOCK_N > t.keys.len
        || (t.bounded_right && (long long)n0 + BLOCK_N - 1 - t.first_query - t.diagonal > t.right)
        || (p.window_left >= 0 && (long long)n0 - t.last_row - t.diagonal < -(long long)p.window_left);
}

// Masks one thread's two rows of a score tile: row r (query i_r = (first_row
// + 8 r) / packed_heads, FlashTile) sees keys [begin, end); this thread's
// columns are n0 + 8 j + 2 (lane % 4) + c.
template <int N_BLOCKS>
__device__ __forceinline__ void mask_scores(const AttnParams& p, const FlashTile& t, int first_row, int n0,
                                            float (&s)[N_BLOCKS * 4], int packed_heads = 1) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long i = (first_row + 8 * r) / packed_heads;
        const long long column = n0 + 2 * (lane % 4);
        long long end = t.keys.len;
        if (t.bounded_right) end = min(end, i + t.diagonal + t.right + 1);
        const long long begin = p.window_left >= 0 ? i + t.diagonal - p.window_left : 0;
        const int lo = (int)max(-1LL, min((long long)N_BLOCKS * 8, begin - column));
        const int hi = (int)max(-1LL, min((long long)N_BLOCKS * 8, end - column));
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (8 * j + c < lo || 8 * j + c >= hi) s[4 * j + 2 * r + c] = neg_inf<float>();
    }
}

// ---------------------------------------------------------------------------
// The backward's tiles: a CTA owns a key tile and visits the query tiles that see it.

// A CTA's key tile: keys [n0, n0 + BLOCK_N) of sequence b, key/value head h_kv.
struct KeyTile {
    int b, h_kv, n0;
    SeqSpan queries, keys;
    long long diagonal;  // key index on the diagonal of query 0
};

// flash_plan<BLOCK_N, KEY_ROWS> laid the sequences' key tiles out in order; a CTA
// past the last tile has none. last_first: a sequence's key tiles run from its
// last to its first in the grid (the deterministic Hopper backward, where the
// later key tiles take the earlier turns).
template <int BLOCK_N>
__device__ __forceinline__ bool locate_key_tile(const AttnParams& p, const int* order, const int* tile_offsets,
                                                KeyTile& t, bool last_first = false) {
    t.h_kv = blockIdx.x % p.heads_kv;
    const int tile = blockIdx.x / p.heads_kv;
    if (tile >= tile_offsets[p.batch]) return false;
    const int pos = plan_position(p, tile_offsets, tile);
    t.b = order[pos];
    t.n0 = (last_first ? tile_offsets[pos + 1] - 1 - tile : tile - tile_offsets[pos]) * BLOCK_N;
    t.queries = query_span(p, t.b);
    t.keys = key_span(p, t.b);
    t.diagonal = p.lower_right ? (long long)t.keys.len - t.queries.len : 0;
    return true;
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

// The key tiles [first, last] of t's sequence whose query_tiles hold query
// tile m (one that exists: m BLOCK_M < len_q; first > last when none does):
// an interval, since both ends of query_tiles grow with the key tile. Each
// bound is query_tiles' inequality solved for the key tile: its rows'
// beginning below min((m + 1) BLOCK_M, len_q) (its first query tile is at
// most m, and not past the queries), its rows' end above m BLOCK_M.
struct KeyTiles {
    int first, last;
};

__device__ __forceinline__ long long floor_div(long long a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ KeyTiles key_tiles_seeing(const AttnParams& p, const KeyTile& t, int m) {
    long long right, first = 0, last = ceil_div(t.keys.len, BLOCK_N) - 1;
    if (right_bound(p, right))
        last = min(last, floor_div(min((long long)(m + 1) * BLOCK_M, (long long)t.queries.len) + t.diagonal + right - 1,
                                   BLOCK_N));
    if (p.window_left >= 0)
        first = max(first, floor_div((long long)m * BLOCK_M + t.diagonal - p.window_left - BLOCK_N, BLOCK_N) + 1);
    return {(int)first, (int)last};
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
