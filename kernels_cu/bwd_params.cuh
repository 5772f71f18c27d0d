// bwd_params.cuh — the backward's own tensors, and where a query tile's dQ
// accumulates in the Hopper kernel's accumulator.
#pragma once
#include "varlen.cuh"

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

// The slot of query tile m_tile (64 rows) of sequence b among a head's
// tiles_per_head: each sequence starts at a 64-row boundary one slot past
// the last, so no two sequences share a slot, and the slots stay O(total_q).
__device__ __forceinline__ long long query_tile_slot(const SeqSpan& queries, int b, int m_tile) {
    return queries.start / 64 + b + m_tile;
}
