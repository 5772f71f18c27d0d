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
#include "mma.cuh"

// A bias element at `at` (global or shared memory) applied to a scaled
// score: plus an additive bias, or -inf where a bool mask hides the pair.
template <typename T>
__device__ __forceinline__ float biased_at(const AttnParams& p, const unsigned char* at, float scaled) {
    if (p.bias_kind == BIAS_BOOL) return *at ? scaled : neg_inf<float>();
    return scaled + to_acc(*(const T*)at);
}

__device__ __forceinline__ int bias_element_size(const AttnParams& p, int storage_size) {
    return p.bias_kind == BIAS_BOOL ? 1 : storage_size;
}

// Element (b, h, i, j) of the bias in global memory.
template <typename T>
__device__ __forceinline__ const unsigned char* bias_address(const AttnParams& p, int b, int h, long long i, long long j) {
    return (const unsigned char*)p.bias + (b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride +
                                           j * p.bias_col_stride) * bias_element_size(p, sizeof(T));
}

// The bias of a tile, query rows [m0, m0 + ROWS) x keys [n0, n0 + COLS),
// staged in shared memory by 4-byte cp.async words, so that its loads are
// coalesced and in flight with the K / V tiles instead of one dependent load
// per score. Each row starts at its own offset (0..3) in its first word, kept
// after the words: rows of the caller's tensor need not be aligned. Only for
// a bias whose keys are adjacent (bias_col_stride 1); staged() says so. Rows
// past rows_valid and keys past cols_valid are not read.
template <typename T, int ROWS, int COLS>
struct BiasTile {
    static constexpr int WORDS = COLS * (int)sizeof(T) / 4 + 1;  // per row, whatever its offset
    static constexpr int BYTES = ROWS * WORDS * 4 + ROWS * 4;    // words, then the rows' offsets

    static __device__ __forceinline__ bool staged(const AttnParams& p) {
        return p.bias_kind != BIAS_NONE && p.bias_col_stride == 1;
    }
    template <int THREADS>
    static __device__ __forceinline__ void load(unsigned char* tile, const AttnParams& p, int b, int h, int m0,
                                                int rows_valid, int n0, int cols_valid) {
        const int bytes = min(COLS, cols_valid - n0) * bias_element_size(p, sizeof(T));
        for (int index = threadIdx.x; index < ROWS * WORDS; index += THREADS) {
            const int r = index / WORDS, w = index % WORDS;
            const bool valid = m0 + r < rows_valid;
            const unsigned char* first = valid ? bias_address<T>(p, b, h, m0 + r, n0) : nullptr;
            const int offset = (int)((unsigned long long)first % 4);
            if (w == 0) ((int*)(tile + ROWS * WORDS * 4))[r] = offset;  // rows not loaded too: aligned reads there
            if (valid && 4 * w < offset + bytes) cp_async_4(tile + 4 * (r * WORDS + w), first - offset + 4 * w);
        }
    }
    // Row r's first element (key n0), once the tile is in; a row that was not
    // loaded reads its unwritten words.
    static __device__ __forceinline__ const unsigned char* row(const unsigned char* tile, int r) {
        return tile + 4 * r * WORDS + ((const int*)(tile + ROWS * WORDS * 4))[r];
    }
};

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
