// bwd_params.cuh — the backward's own tensors, where a query tile's dQ
// accumulates in the Hopper kernel's accumulator, and the turns the
// deterministic mode takes to add to it.
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

// The deterministic mode's turns (dq_turns): a key tile reads its turn with
// acquire (the additions it waits for are visible once the count is), and
// passes it on with release, once its own additions are complete.
__device__ __forceinline__ int load_acquire(const int* at) {
    int value;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(at) : "memory");
    return value;
}
__device__ __forceinline__ int load_relaxed(const int* at) {
    int value;
    asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(at) : "memory");
    return value;
}
// Spins on relaxed loads (an acquire each time would invalidate L1 each
// time), then acquires once: the count stays `mine` until the waiter passes it on.
__device__ __forceinline__ void wait_for_turn(const int* turn, int mine) {
    while (load_relaxed(turn) != mine) {}
    load_acquire(turn);
}
__device__ __forceinline__ void store_release(int* at, int value) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" :: "l"(at), "r"(value) : "memory");
}
