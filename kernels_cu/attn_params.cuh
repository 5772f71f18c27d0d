// attn_params.cuh — the packed-form attention call as every kernel receives it
// (by value, one struct). varattn/cuda/structs.py packs it on the host in the
// same field order; tests/test_kernels_compile.py checks both layouts agree.
// Strides are in elements. 8-byte fields first, then 4-byte ones, so the
// layout has no padding.
#pragma once

struct AttnParams {
    const void* q;              // (total_q, heads, head_dim)
    const void* k;              // (total_k, heads_kv, head_dim)
    const void* v;              // (total_k, heads_kv, head_dim_v)
    void* out;                  // (total_q, heads, head_dim_v)
    void* lse;                  // (heads, total_q) contiguous; float, double for fp64
    const void* bias;           // [b, h, i, j] by the bias strides, or null
    const int* cu_seqlens_q;    // (batch + 1): where each sequence starts
    const int* cu_seqlens_k;
    const int* seqused_q;       // (batch): rows used from each start, or null
    const int* seqused_k;
    long long q_row_stride, q_head_stride;
    long long k_row_stride, k_head_stride;
    long long v_row_stride, v_head_stride;
    long long out_row_stride, out_head_stride;
    long long bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
    long long total_q, total_k;
    double scale;
    int batch, heads, heads_kv, head_dim, head_dim_v;
    int max_seqlen_q, max_seqlen_k;
    int bias_kind;              // 0 none, 1 bool (nonzero = take part), 2 additive
    int causal;
    int lower_right;            // diagonal through (Lq - 1, Lk - 1) instead of (0, 0)
    int window_left, window_right;  // -1: unbounded
};

enum BiasKind { BIAS_NONE = 0, BIAS_BOOL = 1, BIAS_ADDITIVE = 2 };
