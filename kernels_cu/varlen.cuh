// varlen.cuh — where sequence b lives in the packed tensors, and which keys a
// query sees. Everything read from cu_seqlens / seqused is clamped to the
// tensors and to max_seqlen, so no content of them makes a kernel step
// outside its buffers.
#pragma once
#include "attn_params.cuh"

struct SeqSpan {
    long long start;  // first row in the packed tensor
    int len;          // rows
};

__device__ __forceinline__ SeqSpan seq_span(const int* cu_seqlens, const int* seqused, int b,
                                            long long total, int max_seqlen) {
    long long start = min(max((long long)cu_seqlens[b], 0LL), total);
    long long end = min(max((long long)cu_seqlens[b + 1], start), total);
    long long len = end - start;
    if (seqused != nullptr) len = min(len, (long long)max(seqused[b], 0));
    return {start, (int)min(len, (long long)max_seqlen)};
}

__device__ __forceinline__ SeqSpan query_span(const AttnParams& p, int b) {
    return seq_span(p.cu_seqlens_q, p.seqused_q, b, p.total_q, p.max_seqlen_q);
}
__device__ __forceinline__ SeqSpan key_span(const AttnParams& p, int b) {
    return seq_span(p.cu_seqlens_k, p.seqused_k, b, p.total_k, p.max_seqlen_k);
}

// The sequence whose slot [cu[b], cu[b+1]) holds row `row`, or -1.
__device__ __forceinline__ int sequence_of(const int* cu_seqlens, int batch, long long row) {
    int lo = 0, hi = batch;  // answer in [lo, hi)
    if (hi <= 0 || row < cu_seqlens[0]) return -1;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (cu_seqlens[mid] <= row) lo = mid; else hi = mid;
    }
    return row < cu_seqlens[lo + 1] ? lo : -1;
}

// Causal and window masks, both measured from one diagonal: key j is on the
// diagonal of query i when j == i (upper-left) or j == i + Lk - Lq (lower-right).
__device__ __forceinline__ bool key_visible(const AttnParams& p, int i, int j, int len_q, int len_k) {
    long long from_diagonal = (long long)j - i - (p.lower_right ? (long long)len_k - len_q : 0LL);
    if (p.causal && from_diagonal > 0) return false;
    if (p.window_left >= 0 && from_diagonal < -(long long)p.window_left) return false;
    if (p.window_right >= 0 && from_diagonal > (long long)p.window_right) return false;
    return true;
}
