// efficient_bwd.cu — the efficient backend's backward: dQ, dK, dV and the
// gradient of an additive bias, with the forward's bias or bool mask,
// dropout, fp32 and head dims up to 256 (efficient_fwd.cu), from the saved
// LSE with the probabilities recomputed; memory O(total tokens) plus dbias.
//
// First the preprocess flash_bwd_delta (bwd_delta.cuh): delta =
// rowsum(dO * O) - dLSE. Then the main pass, flash_bwd.cu's algorithm, per
// CTA = (key tile of 64 keys, key/value head, sequence, column block), K and
// V resident in shared memory; for every query head of the group and every
// query tile of BLOCK_M rows that sees some of the keys:
//   1. Q, dO (cp.async), lse and delta -> shared memory, and the bias tile
//      (efficient_common.cuh: BiasTile) when its keys are adjacent.
//   2. Each warp owns 16 keys and works transposed, keys as rows:
//        S^T = K Q^T, biased and masked as in the forward,
//        P^T = exp(S^T - lse), Pd^T = P^T kept by dropout, times 1 / (1 - p)
//        dV += Pd^T dO
//        dP^T = V dO^T, kept by dropout, times 1 / (1 - p)
//        dS^T = P^T * (dP^T - delta)        -> dbias (unscaled), if asked
//        dK += dS^T Q
//      dK and dV stay in registers for the whole CTA (no atomics for GQA).
//      A call without bias, dropout or dbias takes flash_bwd.cu's plain loop
//      for P^T and dS^T (the scale folded into exp2).
//   3. dS^T goes through shared memory; the warps then split the query
//      rows (and, at BLOCK_M 32, the columns), dQ = scale dS K, added to a
//      float32 accumulator: on sm_90 staged in the free Q / dO tiles and
//      added by bulk reductions (one per row), on sm_80 by atomics.
//   4. dK * scale and dV written once.
// The column block (blockIdx.y): past head dim 128 (fp32: 64) dK and dV
// of all columns do not fit in registers, so each CTA accumulates OUT_COLS
// of them and recomputes S^T and dP^T (over the full head dim) for itself.
// The gradient is not deterministic (dQ adds in any order); deterministic
// calls go to the math backend.
//
// Tiles: 4 warps, 64 keys. OUT_COLS (varattn/backends/efficient.py): fp16 /
// bf16 the head dim up to 128, half of it past that; ptxas (NVRTC, CUDA 13)
// spills 60 to 84 bytes at 96 to 128 columns on sm_90a (up to 212 on
// sm_80), which still beats recomputing S^T and dP^T (H200, W8 forward +
// backward: 64 columns 28.6 ms, 128 columns 19.5 ms). fp32 at most 64 (48
// at head dim 96; 44 bytes spilled at head dim 64 with three passes).
// BLOCK_M 64, except fp32 past head dim 128: 32, so that the 4-byte K, V,
// Q and dO tiles fit in shared memory (217 KB at head dim 256: sm_90 only;
// the host declines what the device cannot hold).
#include "block_ranges.cuh"
#include "bwd_delta.cuh"
#include "efficient_common.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "operands.cuh"
#include "tma.cuh"

#define EFFICIENT_BWD_THREADS 128
#define EFFICIENT_BWD_WARPS 4
#define KEY_BLOCK 64

// Where the gradient of an additive bias goes: dbias[b, h, i, j] by these
// strides (elements, the bias's dtype), or null.
struct BiasGrad {
    void* dbias;
    long long batch_stride, head_stride, row_stride, col_stride;
};

template <typename T, int HEAD_DIM, int OUT_COLS, int BLOCK_M, int PASSES>
__global__ void __launch_bounds__(EFFICIENT_BWD_THREADS, 1)
efficient_bwd(const AttnParams p, const int* order, const int* tile_offsets, const BwdParams g, const BiasGrad bg,
              const Dropout d) {
    using Ops = Operands<T, PASSES>;
    using Rows = PaddedRows<T, HEAD_DIM>;
    using DsRows = PaddedRows<T, BLOCK_M>;
    constexpr int PITCH = Rows::PITCH, DS_PITCH = DsRows::PITCH, K_STEP = Ops::K_STEP;
    constexpr int N_BLOCKS = BLOCK_M / 8, D_BLOCKS = OUT_COLS / 8;
    // dQ: warps split BLOCK_M rows in ROW_GROUPS of 16 and the columns in the rest.
    constexpr int ROW_GROUPS = BLOCK_M / 16, COL_GROUPS = EFFICIENT_BWD_WARPS / ROW_GROUPS;
    constexpr int DQ_COLS = OUT_COLS / COL_GROUPS, DQ_BLOCKS = DQ_COLS / 8;
    static_assert(DQ_COLS % 16 == 0 && OUT_COLS % 16 == 0, "B operands cover 16 columns");
    static_assert(EFFICIENT_BWD_WARPS * 16 * (DQ_COLS + 8) * 4 <= 2 * BLOCK_M * PITCH * (int)sizeof(T),
                  "dQ staging fits in the Q and dO tiles");

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* k_tile = (T*)shared_bytes;
    T* v_tile = k_tile + KEY_BLOCK * PITCH;
    T* q_tile = v_tile + KEY_BLOCK * PITCH;
    T* do_tile = q_tile + BLOCK_M * PITCH;
    T* ds_tile = do_tile + BLOCK_M * PITCH;                 // dS^T: [key][query]
    float* lse_tile = (float*)(ds_tile + KEY_BLOCK * DS_PITCH);  // log2-scaled
    float* delta_tile = lse_tile + BLOCK_M;
    using Bias = BiasTile<T, BLOCK_M, KEY_BLOCK>;               // queries x keys
    unsigned char* bias_tile = (unsigned char*)(delta_tile + BLOCK_M);

    KeyTile t;
    if (!locate_key_tile<KEY_BLOCK>(p, order, tile_offsets, t)) return;
    const int b = t.b, h_kv = t.h_kv, n0 = t.n0, col0 = blockIdx.y * OUT_COLS;
    const SeqSpan queries = t.queries, keys = t.keys;
    const QueryTiles m_tiles = query_tiles<BLOCK_M, KEY_BLOCK>(p, n0, queries.len, t.diagonal);

    const T* k = (const T*)p.k + keys.start * p.k_row_stride + h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + keys.start * p.v_row_stride + h_kv * p.v_head_stride;
    load_tile<T, KEY_BLOCK, HEAD_DIM, EFFICIENT_BWD_THREADS, Rows>((unsigned char*)k_tile, k, p.k_row_stride, n0, keys.len,
                                                                   p.head_dim);
    load_tile<T, KEY_BLOCK, HEAD_DIM, EFFICIENT_BWD_THREADS, Rows>((unsigned char*)v_tile, v, p.v_row_stride, n0, keys.len,
                                                                   p.head_dim);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float scale = (float)p.scale;
    const int bias_size = bias_element_size(p, sizeof(T));
    const int key_row = warp * 16 + lane / 4;  // this thread's keys: key_row and key_row + 8 of the tile
    const int dq_row = (warp % ROW_GROUPS) * 16, dq_col = col0 + (warp / ROW_GROUPS) * DQ_COLS;  // this warp's dQ
    // Lane addresses in the tiles: K and V from this warp's keys, dS^T read as dS from its dQ rows.
    const typename Ops::Lane k_a = Ops::a_rows_lane(k_tile + warp * 16 * PITCH, PITCH);
    const typename Ops::Lane v_a = Ops::a_rows_lane(v_tile + warp * 16 * PITCH, PITCH);
    const typename Ops::Lane q_b = Ops::b_rows_lane(q_tile, PITCH), do_b = Ops::b_rows_lane(do_tile, PITCH);
    // (dK, dV and dQ read only this CTA's, and this warp's, columns.)
    const typename Ops::Lane q_bt = Ops::b_cols_lane(q_tile + col0, PITCH), do_bt = Ops::b_cols_lane(do_tile + col0, PITCH);
    const typename Ops::Lane k_bt = Ops::b_cols_lane(k_tile + dq_col, PITCH);
    const typename Ops::Lane ds_at = Ops::a_cols_lane(ds_tile + dq_row, DS_PITCH);
    float dk[D_BLOCKS * 4], dv[D_BLOCKS * 4];
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) dk[e] = dv[e] = 0.f;

    const int group = p.heads / p.heads_kv;
    for (int h = h_kv * group; h < (h_kv + 1) * group; ++h) {
        const T* q = (const T*)p.q + queries.start * p.q_row_stride + h * p.q_head_stride;
        const T* dout = (const T*)g.dout + queries.start * g.dout_row_stride + h * g.dout_head_stride;
        const float* lse = (const float*)p.lse + h * p.total_q + queries.start;
        const float* delta = g.delta + h * p.total_q + queries.start;
        for (int m_tile = m_tiles.first; m_tile < m_tiles.end; ++m_tile) {
            const int m0 = m_tile * BLOCK_M;
#if __CUDA_ARCH__ >= 900
            if (lane < 16) bulk_wait_read<0>();  // the previous dQ has left q_tile / do_tile
#endif
            __syncthreads();  // every warp is done with the previous Q, dO and dS^T
            load_tile<T, BLOCK_M, HEAD_DIM, EFFICIENT_BWD_THREADS, Rows>((unsigned char*)q_tile, q, p.q_row_stride, m0,
                                                                         queries.len, p.head_dim);
            load_tile<T, BLOCK_M, HEAD_DIM, EFFICIENT_BWD_THREADS, Rows>((unsigned char*)do_tile, dout, g.dout_row_stride,
                                                                         m0, queries.len, p.head_dim);
            if (Bias::staged(p))
                Bias::template load<EFFICIENT_BWD_THREADS>(bias_tile, p, b, h, m0, queries.len, n0, keys.len);
            cp_async_commit();
            stage_lse_delta<BLOCK_M>(lse_tile, delta_tile, lse, delta, m0, queries.len);
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x BLOCK_M queries.
            float s[N_BLOCKS * 4], dp[N_BLOCKS * 4];
#pragma unroll
            for (int e = 0; e < N_BLOCKS * 4; ++e) s[e] = dp[e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / K_STEP; ++kk) {
                const typename Ops::A ak = Ops::a_rows(k_a, PITCH, 0, kk * K_STEP);
                const typename Ops::A av = Ops::a_rows(v_a, PITCH, 0, kk * K_STEP);
#pragma unroll
                for (int np = 0; np < N_BLOCKS / 2; ++np) {
                    Ops::mma(&s[8 * np], ak, Ops::b_rows(q_b, PITCH, np * 16, kk * K_STEP));
                    Ops::mma(&dp[8 * np], av, Ops::b_rows(do_b, PITCH, np * 16, kk * K_STEP));
                }
            }
            // P^T (kept: s) and dS^T (dp) in place; masked elements become 0.
            const bool crosses = pair_crosses_edge<BLOCK_M, KEY_BLOCK>(p, t, n0, m0);
            QueryRange seen_by[2] = {};  // the queries this thread's two keys see, where masks apply
            if (crosses) seen_by[0] = visible_queries(p, t, n0 + key_row), seen_by[1] = visible_queries(p, t, n0 + key_row + 8);
            const bool plain = p.bias_kind == BIAS_NONE && !d.threshold && bg.dbias == nullptr;
            if (plain) {  // flash_bwd.cu's loop: the scale folded into exp2
#pragma unroll
                for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = 8 * j + 2 * (lane % 4) + e % 2;
                        const bool visible = !crosses || seen_by[e / 2].contains(m0 + c);
                        const float prob = visible ? fast_exp2(fmaf(s[4 * j + e], scale * LOG2_E, -lse_tile[c])) : 0.f;
                        s[4 * j + e] = prob;
                        dp[4 * j + e] = prob * (dp[4 * j + e] - delta_tile[c]);
                    }
            } else {
#pragma unroll
                for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = 8 * j + 2 * (lane % 4) + e % 2, i = m0 + c, key = n0 + key_row + 8 * (e / 2);
                        const bool inside = i < queries.len && key < keys.len;
                        float x = s[4 * j + e] * scale;
                        if (p.bias_kind != BIAS_NONE && (Bias::staged(p) || inside)) {
                            const float biased = biased_at<T>(p, Bias::staged(p) ? Bias::row(bias_tile, c) + (key - n0) * bias_size
                                                                                  : bias_address<T>(p, b, h, i, key), x);
                            x = inside ? biased : x;
                        }
                        const bool visible = !crosses || seen_by[e / 2].contains(i);
                        const float prob = visible ? fast_exp2(fmaf(x, LOG2_E, -lse_tile[c])) : 0.f;
                        float kept = 1.f;
                        if (d.threshold) {
                            const uint4 w = dropout_words(d, h, queries.start + i, key / 4);
                            kept = word_of(w, key % 4) < d.threshold ? 0.f : d.scale;
                        }
                        const float ds = prob * (dp[4 * j + e] * kept - delta_tile[c]);
                        s[4 * j + e] = prob * kept;
                        dp[4 * j + e] = ds;
                        if (bg.dbias != nullptr && blockIdx.y == 0 && inside)
                            ((T*)bg.dbias)[b * bg.batch_stride + h * bg.head_stride + i * bg.row_stride +
                                           key * bg.col_stride] = from_acc<T>(ds);
                    }
            }
            // dV += Pd^T dO and dK += dS^T Q over this CTA's columns: A from registers.
#pragma unroll
            for (int kk = 0; kk < BLOCK_M / K_STEP; ++kk) {
                const typename Ops::A ap = Ops::a_acc(s, kk * K_STEP / 8);
                const typename Ops::A ads = Ops::a_acc(dp, kk * K_STEP / 8);
#pragma unroll
                for (int dd = 0; dd < D_BLOCKS / 2; ++dd) {
                    Ops::mma(&dv[8 * dd], ap, Ops::b_cols(do_bt, PITCH, kk * K_STEP, dd * 16));
                    Ops::mma(&dk[8 * dd], ads, Ops::b_cols(q_bt, PITCH, kk * K_STEP, dd * 16));
                }
            }
            // dS^T -> shared memory, rows = keys.
#pragma unroll
            for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    store2<T>(ds_tile + (key_row + 8 * r) * DS_PITCH + 8 * j + 2 * (lane % 4), dp[4 * j + 2 * r],
                              dp[4 * j + 2 * r + 1]);
            __syncthreads();

            // dQ = scale dS K: this warp's 16 query rows x DQ_COLS columns.
            float dq[DQ_BLOCKS * 4];
#pragma unroll
            for (int e = 0; e < DQ_BLOCKS * 4; ++e) dq[e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KEY_BLOCK / K_STEP; ++kk) {
                const typename Ops::A ads = Ops::a_cols(ds_at, DS_PITCH, kk * K_STEP, 0);
#pragma unroll
                for (int dd = 0; dd < DQ_BLOCKS / 2; ++dd)
                    Ops::mma(&dq[8 * dd], ads, Ops::b_cols(k_bt, PITCH, kk * K_STEP, dd * 16));
            }
            const int columns = min(DQ_COLS, p.head_dim - dq_col);  // a multiple of 8; may be <= 0
            const long long dq_row_stride = (long long)p.heads * p.head_dim;
            float* dq_rows = g.dq_accum + ((queries.start + m0 + dq_row) * p.heads + h) * (long long)p.head_dim + dq_col;
            // the free Q / dO tiles stage it on sm_90
            add_dq_rows<DQ_BLOCKS>(dq, dq_rows, dq_row_stride, queries.len - (m0 + dq_row), columns, scale,
                                   (float*)q_tile + warp * 16 * (DQ_COLS + 8), DQ_COLS + 8);
        }
    }
#if __CUDA_ARCH__ >= 900
    if (lane < 16) bulk_wait_read<0>();  // shared memory must outlive the copies' reads
#endif

    // dK * scale and dV for this warp's keys and the CTA's columns, once.
    store_dk_dv<T, D_BLOCKS>(p, g, keys, h_kv, n0 + key_row, p.head_dim, col0, dk, dv, scale);
}
