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
//
// The backward (math_grad_q, math_grad_kv, after the forward, with notes on
// their thread mapping) keeps no scores either: it recomputes P = exp(S - lse) from the
// forward's lse, once per (query row, head) block for dQ and dbias and once
// per (key row, kv head) block for dK and dV, each sum in a fixed order.
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
    t.b = sequence_of(p.cu_seqlens_q, p.batch, t.row);
    if (t.b < 0) return t;
    const SeqSpan queries = query_span(p, t.b);
    if (t.row - queries.start >= queries.len) { t.b = -1; return t; }
    t.i = (int)(t.row - queries.start);
    t.len_q = queries.len;
    t.keys = key_span(p, t.b);
    return t;
}

// The scaled, biased score of query i and key j of sequence b for head h, or
// -inf where hidden: the warp's dot product of one of them staged in shared
// memory (`staged`, accumulation type) and the other in global memory.
// Every lane gets it; whether it is hidden is uniform across the warp.
template <typename T, typename Acc>
__device__ Acc warp_score(const AttnParams& p, int b, int h, int i, int j, int len_q, int len_k, const Acc* staged,
                          const T* other) {
    bool keep = key_visible(p, i, j, len_q, len_k);
    Acc bias = 0;
    if (keep && p.bias_kind != BIAS_NONE) {
        const long long at = b * p.bias_batch_stride + h * p.bias_head_stride + i * p.bias_row_stride + j * p.bias_col_stride;
        if (p.bias_kind == BIAS_BOOL) keep = ((const unsigned char*)p.bias)[at] != 0;
        else bias = to_acc(((const T*)p.bias)[at]);
    }
    if (!keep) return neg_inf<Acc>();
    Acc dot = 0;
    for (int d = threadIdx.x % 32; d < p.head_dim; d += 32) dot += staged[d] * to_acc(other[d]);
    return warp_sum(dot) * (Acc)p.scale + bias;
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
    for (int j = threadIdx.x / 32; j < t.keys.len; j += WARPS) {
        const T* k = (const T*)p.k + (t.keys.start + j) * p.k_row_stride + t.h_kv * p.k_head_stride;
        const Acc score = warp_score(p, t.b, t.h, t.i, j, t.len_q, t.keys.len, q_row, k);
        if (threadIdx.x % 32 == 0) s[j] = score;
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

// ---------------------------------------------------------------------------
// The backward, from the forward's out and lse. Probabilities are recomputed
// (P = exp(S - lse)), so no scores are kept; two launches over all rows, each
// output element written by one block and summed in a fixed order: the same
// bits on every run, no atomics.
//   math_grad_q:  one block per (query row, head): delta = dO . O - dLSE (kept
//                 for math_grad_kv), then warps over keys: dP_j = dO . v_j,
//                 dS_j = P_j (dP_j - delta), dQ += dS_j k_j (per-warp sums in
//                 registers, lanes splitting head_dim, added warp by warp),
//                 and dS_j into dbias[b, h, i, j] when the bias needs a gradient.
//   math_grad_kv: one block per (key row, key/value head): warps over the
//                 (query row, query head of the group) pairs of its sequence,
//                 dV += P dO_i, dK += dS q_i, reduced the same way.
// Rows outside every sequence are left as the host zeroed them.

struct MathGrads {
    const void* dout;           // (total_q, heads, head_dim_v), strides below
    const void* dlse;           // (heads, total_q) accumulation type, or null
    void* dq;                   // (total_q, heads, head_dim) contiguous, zeroed
    void* dk;                   // (total_k, heads_kv, head_dim) contiguous, zeroed
    void* dv;                   // (total_k, heads_kv, head_dim_v) contiguous, zeroed
    void* dbias;                // (batch, heads, Mq, Mk) contiguous, zeroed, or null
    void* delta;                // (heads, total_q) accumulation type, written by math_grad_q
    long long dout_row_stride, dout_head_stride;
    long long dbias_row_stride;  // Mk; the head stride is Mq * Mk
    long long dbias_head_stride;
};

#define SLICES (MAX_HEAD_DIM / 32)  // head_dim elements per lane

// Add the warps' partial sums (WARPS x width, in shared memory) in warp order and store them scaled.
template <typename T, typename Acc>
__device__ void store_warp_sums(const Acc (*partial)[MAX_HEAD_DIM], int width, Acc scale, T* destination) {
    __syncthreads();
    for (int d = threadIdx.x; d < width; d += THREADS) {
        Acc total = 0;
        for (int w = 0; w < WARPS; ++w) total += partial[w][d];
        destination[d] = from_acc<T>(total * scale);
    }
}

// Stage `width` elements of a global row in shared memory in the accumulation type.
template <typename T, typename Acc>
__device__ __forceinline__ void stage_row(Acc* staged, const T* row, int width) {
    for (int d = threadIdx.x; d < width; d += THREADS) staged[d] = to_acc(row[d]);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) math_grad_q(const AttnParams p, const MathGrads g) {
    using Acc = acc_t<T>;
    const RowTask t = locate_row(p, 0);
    if (t.b < 0) return;
    __shared__ Acc q_row[MAX_HEAD_DIM], do_row[MAX_HEAD_DIM];
    __shared__ Acc partial[WARPS][MAX_HEAD_DIM];
    const T* dout = (const T*)g.dout + t.row * g.dout_row_stride + t.h * g.dout_head_stride;
    const T* out = (const T*)p.out + t.row * p.out_row_stride + t.h * p.out_head_stride;
    stage_row(q_row, (const T*)p.q + t.row * p.q_row_stride + t.h * p.q_head_stride, p.head_dim);
    stage_row(do_row, dout, p.head_dim_v);
    Acc dot = 0;
    for (int d = threadIdx.x; d < p.head_dim_v; d += THREADS) dot += to_acc(dout[d]) * to_acc(out[d]);
    const long long at = (long long)t.h * p.total_q + t.row;
    const Acc delta = block_reduce<Acc, false>(dot) - (g.dlse != nullptr ? ((const Acc*)g.dlse)[at] : Acc(0));
    if (threadIdx.x == 0) ((Acc*)g.delta)[at] = delta;
    const Acc lse = ((const Acc*)p.lse)[at];
    if (lse == neg_inf<Acc>()) return;  // sees no key: zero gradients

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    Acc dq[SLICES];
#pragma unroll
    for (int e = 0; e < SLICES; ++e) dq[e] = 0;
    for (int j = warp; j < t.keys.len; j += WARPS) {
        const T* k = (const T*)p.k + (t.keys.start + j) * p.k_row_stride + t.h_kv * p.k_head_stride;
        const Acc score = warp_score(p, t.b, t.h, t.i, j, t.len_q, t.keys.len, q_row, k);
        if (score == neg_inf<Acc>()) continue;
        const T* v = (const T*)p.v + (t.keys.start + j) * p.v_row_stride + t.h_kv * p.v_head_stride;
        Acc dp = 0;
        for (int d = lane; d < p.head_dim_v; d += 32) dp += do_row[d] * to_acc(v[d]);
        const Acc ds = acc_exp(score - lse) * (warp_sum(dp) - delta);
#pragma unroll
        for (int e = 0; e < SLICES; ++e)
            if (lane + 32 * e < p.head_dim) dq[e] += ds * to_acc(k[lane + 32 * e]);
        if (g.dbias != nullptr && lane == 0)
            ((T*)g.dbias)[t.b * p.heads * g.dbias_head_stride + t.h * g.dbias_head_stride + t.i * g.dbias_row_stride + j] =
                from_acc<T>(ds);
    }
#pragma unroll
    for (int e = 0; e < SLICES; ++e)
        if (lane + 32 * e < p.head_dim) partial[warp][lane + 32 * e] = dq[e];
    store_warp_sums(partial, p.head_dim, (Acc)p.scale, (T*)g.dq + (t.row * p.heads + t.h) * p.head_dim);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) math_grad_kv(const AttnParams p, const MathGrads g) {
    using Acc = acc_t<T>;
    const long long row = blockIdx.x;
    const int h_kv = blockIdx.y, group = p.heads / p.heads_kv;
    const int b = sequence_of(p.cu_seqlens_k, p.batch, row);
    if (b < 0) return;
    const SeqSpan keys = key_span(p, b), queries = query_span(p, b);
    const int j = (int)(row - keys.start);
    if (j >= keys.len) return;
    __shared__ Acc k_row[MAX_HEAD_DIM], v_row[MAX_HEAD_DIM];
    __shared__ Acc dk_partial[WARPS][MAX_HEAD_DIM], dv_partial[WARPS][MAX_HEAD_DIM];
    stage_row(k_row, (const T*)p.k + row * p.k_row_stride + h_kv * p.k_head_stride, p.head_dim);
    stage_row(v_row, (const T*)p.v + row * p.v_row_stride + h_kv * p.v_head_stride, p.head_dim_v);
    __syncthreads();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    Acc dk[SLICES], dv[SLICES];
#pragma unroll
    for (int e = 0; e < SLICES; ++e) dk[e] = dv[e] = 0;
    for (long long pair = warp; pair < (long long)queries.len * group; pair += WARPS) {
        const int i = (int)(pair / group), h = h_kv * group + (int)(pair % group);
        const long long q_row = queries.start + i;
        const T* q = (const T*)p.q + q_row * p.q_row_stride + h * p.q_head_stride;
        const Acc score = warp_score(p, b, h, i, j, queries.len, keys.len, k_row, q);
        const Acc lse = ((const Acc*)p.lse)[(long long)h * p.total_q + q_row];
        if (score == neg_inf<Acc>() || lse == neg_inf<Acc>()) continue;
        const T* dout = (const T*)g.dout + q_row * g.dout_row_stride + h * g.dout_head_stride;
        Acc dp = 0;
        for (int d = lane; d < p.head_dim_v; d += 32) dp += v_row[d] * to_acc(dout[d]);
        const Acc prob = acc_exp(score - lse);
        const Acc ds = prob * (warp_sum(dp) - ((const Acc*)g.delta)[(long long)h * p.total_q + q_row]);
#pragma unroll
        for (int e = 0; e < SLICES; ++e) {
            const int d = lane + 32 * e;
            if (d < p.head_dim) dk[e] += ds * to_acc(q[d]);
            if (d < p.head_dim_v) dv[e] += prob * to_acc(dout[d]);
        }
    }
#pragma unroll
    for (int e = 0; e < SLICES; ++e) {
        const int d = lane + 32 * e;
        if (d < p.head_dim) dk_partial[warp][d] = dk[e];
        if (d < p.head_dim_v) dv_partial[warp][d] = dv[e];
    }
    store_warp_sums(dk_partial, p.head_dim, (Acc)p.scale, (T*)g.dk + (row * p.heads_kv + h_kv) * p.head_dim);
    store_warp_sums(dv_partial, p.head_dim_v, Acc(1), (T*)g.dv + (row * p.heads_kv + h_kv) * p.head_dim_v);
}
