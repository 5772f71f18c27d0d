// efficient_fwd.cu — the efficient backend's forward: what the flash kernels
// leave out, at flash-like memory. A bool mask or additive bias read in place
// from the caller's padded (B or 1, H or 1, Lq, Lk) tensor, dropout on the
// probabilities, fp32 inputs, and any head dim that is a multiple of 8 up to
// 256; with causal masks in both alignments, windows, GQA and the LSE.
//
// The algorithm is flash_fwd.cu's, per CTA = (query tile of BLOCK_M rows,
// head, sequence), over the key tiles some query of the tile may see, with
// the same plan, grid and tile order (tile_plan.cuh, block_ranges.cuh):
//   1. S = Q K^T on tensor cores (operands.cuh: mma.sync m16n8k16 for fp16
//      and bf16, m16n8k8 on TF32 for fp32, split in three for fp32 accuracy
//      unless allow_tf32).
//   2. With a bias or bool mask (or a negative scale): S * scale plus the
//      bias (or -inf where the mask hides a key), then the causal / window /
//      length masks on tiles that cross an edge. A bias with adjacent keys
//      is staged in shared memory with the V tile (BiasTile: coalesced
//      4-byte cp.async words) and read with one shared load and a select per
//      score, any other is read per element. Without: the masks on S, and
//      the scale goes into the softmax's exp2 as in flash_fwd.cu.
//   3. Online softmax in base 2 on the biased scores; the row sums count
//      every probability, then dropout zeroes the dropped ones (Philox, one
//      call per row and four keys, efficient_common.cuh) before O += P V, and
//      the kept ones are scaled by 1 / (1 - p) with 1 / l at the end.
//   4. O / l and lse = m + ln l written once; a row that sees no key (all of
//      its keys masked) writes zeros and -inf, never NaN.
// K and V are single-buffered and interleaved as in flash_fwd.cu: V(j) and
// the bias tile load while S(j) is computed, K(j + 1) during the softmax
// and P(j) V(j).
//
// HEAD_DIM is a compile-time bucket (32, 64, 96, 128, 192, 256); the real
// head dim is p.head_dim, the columns past it load as zeros and are never
// written. Tiles (4 warps, a warp owns BLOCK_M / 4 query rows; set in
// varattn/backends/efficient.py):
//   fp16 / bf16:  head dims <= 64: 128 x 64; past that 64 x 64 (128 x 32, as
//                 flash_fwd.cu, spills with the bias code: H200, W8 forward
//                 6.25 ms against 5.45 ms)
//   fp32:         64 x 32 at every head dim: shared memory holds 4-byte
//                 elements (133 KB at head dim 256), and three-pass
//                 operands double the fragments.
#include "block_ranges.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "efficient_common.cuh"
#include "operands.cuh"

#define EFFICIENT_THREADS 128
#define EFFICIENT_WARPS 4

// The bias (BOOL_MASK: -inf where the mask hides a key) of one thread's two
// rows of a scaled score tile (query first_row + 8 r, keys n0 + 8 j +
// 2 (lane % 4) + c). From the staged tile: one shared load per score and a
// select, no branch (rows and keys past the sequence read some staged byte
// and keep their score); else from global memory, element by element.
template <typename T, bool BOOL_MASK>
__device__ __forceinline__ float with_bias(const unsigned char* at, float scaled) {
    if (BOOL_MASK) return *at ? scaled : neg_inf<float>();
    return scaled + to_acc(*(const T*)at);
}

template <typename T, int BLOCK_M, int N_BLOCKS, bool BOOL_MASK>
__device__ __forceinline__ void add_bias(const AttnParams& p, const FlashTile& t, const unsigned char* bias_tile,
                                         int first_row, int n0, float (&s)[N_BLOCKS * 4]) {
    using Bias = BiasTile<T, BLOCK_M, N_BLOCKS * 8>;
    constexpr int SIZE = BOOL_MASK ? 1 : sizeof(T);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = first_row + 8 * r;
        const unsigned char* row = Bias::row(bias_tile, i - t.m0) + 2 * (lane % 4) * SIZE;
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int key = n0 + 8 * j + 2 * (lane % 4) + c;
                float& x = s[4 * j + 2 * r + c];
                if (Bias::staged(p)) {
                    const float biased = with_bias<T, BOOL_MASK>(row + (8 * j + c) * SIZE, x);
                    x = i < t.queries.len && key < t.keys.len ? biased : x;
                } else if (i < t.queries.len && key < t.keys.len) {
                    x = with_bias<T, BOOL_MASK>(bias_address<T>(p, t.b, t.h, i, key), x);
                }
            }
    }
}

// S * scale plus the bias or bool mask, for one thread's two rows.
template <typename T, int BLOCK_M, int N_BLOCKS>
__device__ __forceinline__ void bias_scores(const AttnParams& p, const FlashTile& t, const unsigned char* bias_tile,
                                            int first_row, int n0, float (&s)[N_BLOCKS * 4]) {
    const float scale = (float)p.scale;
#pragma unroll
    for (int e = 0; e < N_BLOCKS * 4; ++e) s[e] *= scale;
    if (p.bias_kind == BIAS_BOOL) add_bias<T, BLOCK_M, N_BLOCKS, true>(p, t, bias_tile, first_row, n0, s);
    else if (p.bias_kind == BIAS_ADDITIVE) add_bias<T, BLOCK_M, N_BLOCKS, false>(p, t, bias_tile, first_row, n0, s);
}

// Zeroes the dropped probabilities of one thread's two rows; the two keys of
// a block share one Philox call (keys 2 (lane % 4) + {0, 1} lie in one group of four).
template <int N_BLOCKS>
__device__ __forceinline__ void drop(const Dropout& d, const FlashTile& t, int first_row, int n0, float (&s)[N_BLOCKS * 4]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long row = t.queries.start + first_row + 8 * r;
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j) {
            const int key = n0 + 8 * j + 2 * (lane % 4);
            const uint4 w = dropout_words(d, t.h, row, key / 4);
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (word_of(w, key % 4 + c) < d.threshold) s[4 * j + 2 * r + c] = 0.f;
        }
    }
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int PASSES>
__global__ void __launch_bounds__(EFFICIENT_THREADS, 2)
efficient_fwd(const AttnParams p, const int* order, const int* tile_offsets, const Dropout d) {
    using Ops = Operands<T, PASSES>;
    using Layout = PaddedRows<T, HEAD_DIM>;
    constexpr int PITCH = Layout::PITCH, K_STEP = Ops::K_STEP;
    constexpr int M_SLICES = BLOCK_M / (16 * EFFICIENT_WARPS);  // m16 slices per warp
    constexpr int N_BLOCKS = BLOCK_N / 8, D_BLOCKS = HEAD_DIM / 8;

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* q_tile = (T*)shared_bytes;
    T* k_tile = q_tile + BLOCK_M * PITCH;
    T* v_tile = k_tile + BLOCK_N * PITCH;
    unsigned char* bias_tile = (unsigned char*)(v_tile + BLOCK_N * PITCH);  // BiasTile<T, BLOCK_M, BLOCK_N>

    FlashTile t;
    if (!locate_tile<BLOCK_M, BLOCK_N>(p, order, tile_offsets, blockIdx.x, t)) return;
    const T* q = (const T*)p.q + t.queries.start * p.q_row_stride + t.h * p.q_head_stride;
    const T* k = (const T*)p.k + t.keys.start * p.k_row_stride + t.h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + t.keys.start * p.v_row_stride + t.h_kv * p.v_head_stride;
    if (t.first_tile < t.end_tile) {
        load_tile<T, BLOCK_M, HEAD_DIM, EFFICIENT_THREADS, Layout>((unsigned char*)q_tile, q, p.q_row_stride, t.m0,
                                                                   t.queries.len, p.head_dim);
        load_tile<T, BLOCK_N, HEAD_DIM, EFFICIENT_THREADS, Layout>((unsigned char*)k_tile, k, p.k_row_stride,
                                                                   t.first_tile * BLOCK_N, t.keys.len, p.head_dim);
        cp_async_commit();
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    auto first_row = [&](int ms) { return t.m0 + ms * 16 * EFFICIENT_WARPS + warp * 16 + lane / 4; };
    // Lane addresses in the tiles: Q from this warp's rows.
    const typename Ops::Lane q_lane = Ops::a_rows_lane(q_tile + warp * 16 * PITCH, PITCH);
    const typename Ops::Lane k_lane = Ops::b_rows_lane(k_tile, PITCH), v_lane = Ops::b_cols_lane(v_tile, PITCH);

    float o[M_SLICES][D_BLOCKS * 4], row_max[M_SLICES][2], row_sum[M_SLICES][2];
    start_rows(o, row_max, row_sum);
    // Without a bias and with a positive scale the scale folds into the
    // softmax's exp2, as in flash_fwd.cu, and the running max stays in S's units.
    const bool folded = p.bias_kind == BIAS_NONE && p.scale > 0;
    const float softmax_scale = folded ? (float)p.scale * LOG2_E : LOG2_E;

    for (int n_tile = t.first_tile; n_tile < t.end_tile; ++n_tile) {
        const int n0 = n_tile * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K(n) is in, and every warp is done with V(n - 1)
        load_tile<T, BLOCK_N, HEAD_DIM, EFFICIENT_THREADS, Layout>((unsigned char*)v_tile, v, p.v_row_stride, n0,
                                                                   t.keys.len, p.head_dim);
        if (BiasTile<T, BLOCK_M, BLOCK_N>::staged(p))
            BiasTile<T, BLOCK_M, BLOCK_N>::template load<EFFICIENT_THREADS>(bias_tile, p, t.b, t.h, t.m0, t.queries.len,
                                                                            n0, t.keys.len);
        cp_async_commit();

        // S = Q K^T
        float s[M_SLICES][N_BLOCKS * 4];
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
            for (int e = 0; e < N_BLOCKS * 4; ++e) s[ms][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / K_STEP; ++kk) {
            typename Ops::A a[M_SLICES];
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) a[ms] = Ops::a_rows(q_lane, PITCH, ms * 16 * EFFICIENT_WARPS, kk * K_STEP);
#pragma unroll
            for (int np = 0; np < N_BLOCKS / 2; ++np) {
                const typename Ops::B b = Ops::b_rows(k_lane, PITCH, np * 16, kk * K_STEP);
#pragma unroll
                for (int ms = 0; ms < M_SLICES; ++ms) Ops::mma(&s[ms][8 * np], a[ms], b);
            }
        }

        cp_async_wait<0>();
        __syncthreads();  // V(n) and the bias are in, and every warp is done with K(n)
        if (n_tile + 1 < t.end_tile) {
            load_tile<T, BLOCK_N, HEAD_DIM, EFFICIENT_THREADS, Layout>((unsigned char*)k_tile, k, p.k_row_stride,
                                                                       n0 + BLOCK_N, t.keys.len, p.head_dim);
            cp_async_commit();
        }
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms) {
            // Scaled first where a bias or a negative scale needs it, else in the softmax's exp2.
            if (!folded) bias_scores<T, BLOCK_M, N_BLOCKS>(p, t, bias_tile, first_row(ms), n0, s[ms]);
            if (crosses_edge<BLOCK_N>(p, t, n0)) mask_scores<N_BLOCKS>(p, t, first_row(ms), n0, s[ms]);
            float rescale[2];
            softmax_scores<N_BLOCKS>(s[ms], row_max[ms], row_sum[ms], softmax_scale, rescale);
            rescale_rows<D_BLOCKS>(o[ms], rescale);
            if (d.threshold) drop<N_BLOCKS>(d, t, first_row(ms), n0, s[ms]);
        }

        // O += P V: S's accumulators are the A operand of P.
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / K_STEP; ++kk) {
            typename Ops::A a[M_SLICES];
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) a[ms] = Ops::a_acc(s[ms], kk * K_STEP / 8);
#pragma unroll
            for (int dp = 0; dp < D_BLOCKS / 2; ++dp) {
                const typename Ops::B b = Ops::b_cols(v_lane, PITCH, kk * K_STEP, dp * 16);
#pragma unroll
                for (int ms = 0; ms < M_SLICES; ++ms) Ops::mma(&o[ms][8 * dp], a[ms], b);
            }
        }
    }

#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms)
        write_rows<T, D_BLOCKS>(p, t, first_row(ms), o[ms], row_max[ms], row_sum[ms], folded ? (float)p.scale : 1.f,
                                d.threshold ? d.scale : 1.f, p.head_dim);
}
