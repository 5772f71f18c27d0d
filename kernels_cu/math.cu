// math.cu — the reference kernels: plain attention over the packed form.
//
// The algorithm, in three launches over a chunk of query rows
// [row_begin, row_begin + gridDim.x) of the packed q, all heads at once:
//   1. math_scores:       S[r, h, j] = scale * q_r . k_j + bias, or -inf where masked
//   2. math_softmax:      P = softmax_j(S) in place, lse[h, r] = log sum_j exp(S)
//   3. math_weighted_sum: out[r, h, :] = sum_j P[r, h, j] * v_j
// S lives in a workspace of (rows in chunk, heads, max_seqlen_k) accumulators;
// the host picks the chunk so the workspace stays within a fixed budget, so a
// batch of a million tokens never needs (B, L, L) memory.
//
// Shapes: one block of 128 threads (4 warps) per (query row, head). Scores: a
// warp per key, its lanes splitting head_dim (coalesced k reads), a shuffle
// reduction per score. Weighted sum: a thread per output column (coalesced v
// reads). The q row is staged in shared memory in the accumulation type:
// at most 512 (MAX_HEAD_DIM) x 8 bytes = 4 KB. No tensor cores and no tiling:
// these kernels are the readable reference and the fallback for what the fast
// backends decline (fp64, head dims up to 512, any mix of features), not a
// speed path.
//
// Accumulation is fp32 for fp16/bf16/fp32 storage and fp64 for fp64. A query
// row that sees no key gets probabilities 0, output 0 and lse -inf, never NaN.
#include "attn_params.cuh"
#include "dtypes.cuh"
#include "varlen.cuh"

#define MAX_HEAD_DIM 512
#define THREADS 128
#define WARPS (THREADS / 32)

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
    for (int offset = 16; offset > 0; offset /= 2) x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Every thread of the block gets the result.
template <typename Acc, bool IS_MAX>
__device__ Acc block_reduce(Acc x) {
    __shared__ Acc partial[WARPS];
    x = IS_MAX ? warp_max(x) : warp_sum(x);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = x;
    __syncthreads();
    Acc total = partial[0];
    for (int w = 1; w < WARPS; ++w) total = IS_MAX ? max(total, partial[w]) : total + partial[w];
    __syncthreads();  // partial is reused by the next call
    return total;
}

// The query row this block works on, located in its sequence.
struct RowTask {
    long long row;  // packed query row
    int b;          // its sequence, -1 when the row belongs to none (padding, holes)
    int i;          // its position in the sequence
    int len_q;
    SeqSpan keys;
    int h, h_kv;
};

__device__ RowTask locate_row(const AttnParams& p, long long row_begin) {
    RowTask t;
    t.row = row_begin + blockIdx.x;
    t.h = blockIdx.y;
    t.h_kv = t.h / (p.heads / p.heads_kv);
    t.b = sequence_of_row(p, t.row);
    if (t.b < 0) return t;
    const SeqSpan queries = query_span(p, t.b);
    if (t.row - queries.start >= queries.len) { t.b = -1; return t; }
    t.i = (int)(t.row - queries.start);
    t.len_q = queries.len;
    t.keys = key_span(p, t.b);
    return t;
}

template <typename Acc>
__device__ __forceinline__ Acc* score_row(const AttnParams& p, Acc* scores, const RowTask& t) {
    return scores + ((long long)blockIdx.x * p.heads + t.h) * (long long)max(p.max_seqlen_k, 1);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) math_scores(const AttnParams p, long long row_begin, acc_t<T>* scores) {
    using Acc = acc_t<T>;
    const RowTask t = locate_row(p, row_begin);
    if (t.b < 0) return;

    __shared__ Acc q_row[MAX_HEAD_DIM];
    const T* q = (const T*)p.q + t.row * p.q_row_stride + t.h * p.q_head_stride;
    for (int d = threadIdx.x; d < p.head_dim; d += THREADS) q_row[d] = to_acc(q[d]);
    __syncthreads();

    Acc* s = score_row(p, scores, t);
    const int lane = threadIdx.x % 32;
    for (int j = threadIdx.x / 32; j < t.keys.len; j += WARPS) {
        bool keep = key_visible(p, t.i, j, t.len_q, t.keys.len);
        Acc bias = 0;
        if (keep && p.bias_kind != BIAS_NONE) {
            const long long at = t.b * p.bias_batch_stride + t.h * p.bias_head_stride
                               + t.i * p.bias_row_stride + j * p.bias_col_stride;
            if (p.bias_kind == BIAS_BOOL) keep = ((const unsigned char*)p.bias)[at] != 0;
            else bias = to_acc(((const T*)p.bias)[at]);
        }
        Acc score = neg_inf<Acc>();
        if (keep) {  // uniform across the warp: it depends on j only
            const T* k = (const T*)p.k + (t.keys.start + j) * p.k_row_stride + t.h_kv * p.k_head_stride;
            Acc dot = 0;
            for (int d = lane; d < p.head_dim; d += 32) dot += q_row[d] * to_acc(k[d]);
            score = warp_sum(dot) * (Acc)p.scale + bias;
        }
        if (lane == 0) s[j] = score;
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) math_softmax(const AttnParams p, long long row_begin, acc_t<T>* scores) {
    using Acc = acc_t<T>;
    const RowTask t = locate_row(p, row_begin);
    if (t.b < 0) return;

    Acc* s = score_row(p, scores, t);
    Acc row_max = neg_inf<Acc>();
    for (int j = threadIdx.x; j < t.keys.len; j += THREADS) row_max = max(row_max, s[j]);
    row_max = block_reduce<Acc, true>(row_max);

    Acc* lse = (Acc*)p.lse + t.h * p.total_q + t.row;
    if (row_max == neg_inf<Acc>()) {  // sees no key: zero weights, lse -inf
        for (int j = threadIdx.x; j < t.keys.len; j += THREADS) s[j] = 0;
        if (threadIdx.x == 0) *lse = row_max;
        return;
    }
    Acc sum = 0;
    for (int j = threadIdx.x; j < t.keys.len; j += THREADS) {
        const Acc e = acc_exp(s[j] - row_max);
        s[j] = e;
        sum += e;
    }
    sum = block_reduce<Acc, false>(sum);
    const Acc inv_sum = Acc(1) / sum;
    for (int j = threadIdx.x; j < t.keys.len; j += THREADS) s[j] *= inv_sum;
    if (threadIdx.x == 0) *lse = row_max + acc_log(sum);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) math_weighted_sum(const AttnParams p, long long row_begin, acc_t<T>* scores) {
    using Acc = acc_t<T>;
    const RowTask t = locate_row(p, row_begin);
    if (t.b < 0) return;

    const Acc* probs = score_row(p, scores, t);
    const T* v = (const T*)p.v + t.keys.start * p.v_row_stride + t.h_kv * p.v_head_stride;
    T* out = (T*)p.out + t.row * p.out_row_stride + t.h * p.out_head_stride;
    for (int d = threadIdx.x; d < p.head_dim_v; d += THREADS) {
        Acc acc = 0;
        for (int j = 0; j < t.keys.len; ++j) {
            const Acc weight = probs[j];
            if (weight != 0) acc += weight * to_acc(v[j * p.v_row_stride + d]);
        }
        out[d] = from_acc<T>(acc);
    }
}
