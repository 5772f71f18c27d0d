// efficient_common.cuh — what efficient_fwd.cu and efficient_bwd.cu share:
// the bias or bool mask read in place, and the dropout mask.
//
// The bias: element (b, h, i, j) at the AttnParams bias strides (zero where
// the caller's tensor broadcasts), so the padded (B or 1, H or 1, Lq, Lk)
// tensor the user holds is read where it lies, never copied.
//
// Dropout (varattn/dropout.py on the device): element (h, i, j) (head,
// packed query row, key of the row's sequence) takes word j % 4 of Philox-4x32-10(key = seed, counter = (j / 4, i, offset + h))
// and keeps its probability when that word is at least `threshold`. Nothing
// is stored: forward and backward regenerate the words they need.
#pragma once
#include "attn_params.cuh"
#include "dtypes.cuh"

// The scaled score of query i and key j (both inside sequence b) for head h
// under the bias: plus an additive bias, or -inf where a bool mask hides it.
template <typename T>
__device__ __forceinline__ float biased(const AttnParams& p, int b, int h, int i, int j, float scaled) {
    const long long at = b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride + j * p.bias_col_stride;
    if (p.bias_kind == BIAS_BOOL) return ((const unsigned char*)p.bias)[at] ? scaled : neg_inf<float>();
    return scaled + to_acc(((const T*)p.bias)[at]);
}

struct Dropout {
    unsigned long long seed, offset;
    unsigned threshold;  // floor(p * 2^32); 0: no dropout
    float scale;         // 1 / (1 - p), applied to the kept probabilities
};

__device__ __forceinline__ uint4 philox4x32(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// The words of keys [4 group, 4 group + 4) for head h and packed query row `row`.
__device__ __forceinline__ uint4 dropout_words(const Dropout& d, int h, long long row, int group) {
    const unsigned long long stream = d.offset + h;
    return philox4x32(make_uint4((unsigned)group, (unsigned)row, (unsigned)stream, (unsigned)(stream >> 32)),
                      (unsigned)d.seed, (unsigned)(d.seed >> 32));
}

__device__ __forceinline__ unsigned word_of(const uint4& w, int index) {
    return index == 0 ? w.x : index == 1 ? w.y : index == 2 ? w.z : w.w;
}
