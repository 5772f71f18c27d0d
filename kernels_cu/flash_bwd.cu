// flash_bwd.cu — the flash backend's backward on tensor cores (mma.sync,
// sm80+): dQ, dK and dV from the saved LSE, probabilities recomputed.
//
// First a preprocess, flash_bwd_delta (bwd_delta.cuh): delta =
// rowsum(dO * O) - dLSE per query row and head.
//
// Then the main pass, per CTA = (key tile of BLOCK_N = 64 keys, key/value
// head, sequence), with K and V resident in shared memory; for every query
// head of the key/value head's group and every query tile of 64 rows that
// sees some of the keys:
//   1. Q, dO (cp.async), lse and delta -> shared memory.
//   2. Each warp owns 16 keys and works transposed, keys as rows:
//        S^T  = K Q^T,   P^T = exp(scale S^T - lse)     (masked where hidden)
//        dV  += P^T dO                                   (P^T from registers)
//        dP^T = V dO^T,  dS^T = P^T * (dP^T - delta)
//        dK  += dS^T Q                                   (dS^T from registers)
//      so dK and dV stay in registers for the whole CTA (summed over the
//      group's query heads: GQA needs no atomics for them).
//   3. dS^T goes through shared memory; each warp then takes 16 query rows,
//      dQ = scale dS K, and adds it to a float32 accumulator:
//        sm_90: staged in the (now free) Q / dO tiles, one bulk reduction
//               (cp.reduce.async.bulk .add.f32) per row by the copy engine;
//        sm_80: atomicAdd per element;
//        deterministic: the key tiles that reach a query tile add to it in
//               key order, each waiting for its turn on a counter
//               (plain loads and stores), so every run sums alike.
//   4. Finally dK * scale and dV are written once.
// Rows past a sequence's end load as zeros; their lse reads as +inf, so P = 0
// there (as for a query that sees no key), and they are never written.
// The grid and its order come from flash_plan over key tiles (longest
// sequences first), as in the forward.
//
// On Hopper (head dims 32 to 128, both modes) flash_bwd_hopper.cu replaces
// the main pass; the preprocess serves both.
//
// Tiles: 4 warps, BLOCK_M = BLOCK_N = 64. Per thread dK and dV take
// HEAD_DIM / 2 fp32 registers each, S^T and dP^T 32 each, so head dims up to
// 128 fit. Shared memory: K, V, Q, dO tiles (rows padded by 16 bytes), dS^T,
// lse and delta (two CTAs per SM). Instance = <type, head_dim, deterministic>:
// resources: NVRTC 13.5, -Xptxas -v (tools/kernel_resources.py writes this table)
//   instance                       arch    registers  spill stores / loads  stack  shared: static + dynamic
//   flash_bwd<bf16_t, 32, false>   sm_80         184               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<bf16_t, 32, false>   sm_90a        202               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<bf16_t, 32, true>    sm_80         217               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<bf16_t, 32, true>    sm_90a        199               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<bf16_t, 64, false>   sm_80         232               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<bf16_t, 64, false>   sm_90a        236               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<bf16_t, 64, true>    sm_80         239               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<bf16_t, 64, true>    sm_90a        239               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<bf16_t, 96, false>   sm_80         255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<bf16_t, 96, false>   sm_90a        255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<bf16_t, 96, true>    sm_80         255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<bf16_t, 96, true>    sm_90a        254               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<bf16_t, 128, false>  sm_80         255             28 / 44 B   32 B  0 B + 77.5 KB
//   flash_bwd<bf16_t, 128, false>  sm_90a        255             60 / 76 B   64 B  0 B + 77.5 KB
//   flash_bwd<bf16_t, 128, true>   sm_80         255             36 / 36 B   40 B  0 B + 77.5 KB
//   flash_bwd<bf16_t, 128, true>   sm_90a        255             52 / 68 B   56 B  0 B + 77.5 KB
//   flash_bwd<half_t, 32, false>   sm_80         184               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<half_t, 32, false>   sm_90a        202               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<half_t, 32, true>    sm_80         217               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<half_t, 32, true>    sm_90a        199               0 / 0 B    0 B  0 B + 29.5 KB
//   flash_bwd<half_t, 64, false>   sm_80         232               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<half_t, 64, false>   sm_90a        236               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<half_t, 64, true>    sm_80         239               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<half_t, 64, true>    sm_90a        239               0 / 0 B    0 B  0 B + 45.5 KB
//   flash_bwd<half_t, 96, false>   sm_80         255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<half_t, 96, false>   sm_90a        255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<half_t, 96, true>    sm_80         255               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<half_t, 96, true>    sm_90a        254               0 / 0 B    0 B  0 B + 61.5 KB
//   flash_bwd<half_t, 128, false>  sm_80         255             28 / 44 B   32 B  0 B + 77.5 KB
//   flash_bwd<half_t, 128, false>  sm_90a        255             60 / 76 B   64 B  0 B + 77.5 KB
//   flash_bwd<half_t, 128, true>   sm_80         255             36 / 36 B   40 B  0 B + 77.5 KB
//   flash_bwd<half_t, 128, true>   sm_90a        255             52 / 68 B   56 B  0 B + 77.5 KB
// end of resources
// Element masks only on pairs of tiles that cross a mask edge (W1 10.2 ->
// 9.3 ms). Measured (H100, bf16, head_dim 128, backward alone): dQ by
// atomics W1 8.7 ms, W2 4.8 ms; by bulk reductions 5.6 / 3.1 ms (193 / 172
// TFLOP/s counting 2.5x the forward's FLOPs; without any dQ writes 4.6 ms).
#include "block_ranges.cuh"
#include "bwd_delta.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "tma.cuh"

#define BWD_THREADS 128
#define BWD_BLOCK 64
static_assert(BWD_BLOCK == 64, "query_tile_slot counts tiles of 64 query rows");

template <typename T, int HEAD_DIM, bool DETERMINISTIC>
__global__ void __launch_bounds__(BWD_THREADS, 1)
flash_bwd(const AttnParams p, const int* order, const int* tile_offsets, const BwdParams g) {
    constexpr int D_BLOCKS = HEAD_DIM / 8, N_BLOCKS = BWD_BLOCK / 8;
    using Rows = PaddedRows<T, HEAD_DIM>;
    constexpr int ROW_BYTES = Rows::ROW_BYTES, DS_ROW_BYTES = PaddedRows<T, BWD_BLOCK>::ROW_BYTES;
    constexpr int TILE_BYTES = BWD_BLOCK * ROW_BYTES;

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    unsigned char* k_tile = shared_bytes;
    unsigned char* v_tile = k_tile + TILE_BYTES;
    unsigned char* q_tile = v_tile + TILE_BYTES;
    unsigned char* do_tile = q_tile + TILE_BYTES;
    unsigned char* ds_tile = do_tile + TILE_BYTES;                      // dS^T: [key][query]
    float* lse_tile = (float*)(ds_tile + BWD_BLOCK * DS_ROW_BYTES);    // log2-scaled
    float* delta_tile = lse_tile + BWD_BLOCK;

    KeyTile t;
    if (!locate_key_tile<BWD_BLOCK>(p, order, tile_offsets, t)) return;
    const int b = t.b, h_kv = t.h_kv, n0 = t.n0;
    const SeqSpan queries = t.queries, keys = t.keys;
    const QueryTiles m_tiles = query_tiles<BWD_BLOCK, BWD_BLOCK>(p, n0, queries.len, t.diagonal);

    const T* k = (const T*)p.k + keys.start * p.k_row_stride + h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + keys.start * p.v_row_stride + h_kv * p.v_head_stride;
    load_tile<T, BWD_BLOCK, HEAD_DIM, BWD_THREADS, Rows>(k_tile, k, p.k_row_stride, n0, keys.len);
    load_tile<T, BWD_BLOCK, HEAD_DIM, BWD_THREADS, Rows>(v_tile, v, p.v_row_stride, n0, keys.len);
    cp_async_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float scale_log2 = (float)p.scale * LOG2_E;
    // ldmatrix row addresses: A operands from 16 rows of a tile (the warp's keys
    // or queries), B operands as the forward reads K (non-transposed) and V (transposed).
    auto a_lane = [&](const unsigned char* tile_, int row_bytes) {
        return smem_address(tile_ + (warp * 16 + lane % 16) * row_bytes + (lane / 16) * 16);
    };
    auto b_lane = [&](const unsigned char* tile_) {
        return smem_address(tile_ + (lane % 8 + (lane / 16) * 8) * ROW_BYTES + ((lane / 8) % 2) * 16);
    };
    auto bt_lane = [&](const unsigned char* tile_) {
        return smem_address(tile_ + (lane % 8 + ((lane / 8) % 2) * 8) * ROW_BYTES + (lane / 16) * 16);
    };
    const unsigned k_a = a_lane(k_tile, ROW_BYTES), v_a = a_lane(v_tile, ROW_BYTES);
    const unsigned q_b = b_lane(q_tile), do_b = b_lane(do_tile);
    const unsigned q_bt = bt_lane(q_tile), do_bt = bt_lane(do_tile), k_bt = bt_lane(k_tile);
    // dS as the A operand of dQ = dS K: transposed 8x8 blocks of the stored dS^T.
    const unsigned ds_at = smem_address(ds_tile + (lane % 8 + (lane / 16) * 8) * DS_ROW_BYTES +
                                        (warp * 16 + ((lane / 8) % 2) * 8) * 2);

    float dk[D_BLOCKS * 4], dv[D_BLOCKS * 4];
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) dk[e] = dv[e] = 0.f;
    const int key_row = warp * 16 + lane / 4;  // this thread's keys: key_row and key_row + 8 of the tile

    const int group = p.heads / p.heads_kv;
    for (int h = h_kv * group; h < (h_kv + 1) * group; ++h) {
        const T* q = (const T*)p.q + queries.start * p.q_row_stride + h * p.q_head_stride;
        const T* dout = (const T*)g.dout + queries.start * g.dout_row_stride + h * g.dout_head_stride;
        const float* lse = (const float*)p.lse + h * p.total_q + queries.start;
        const float* delta = g.delta + h * p.total_q + queries.start;
        for (int m_tile = m_tiles.first; m_tile < m_tiles.end; ++m_tile) {
            const int m0 = m_tile * BWD_BLOCK;
#if __CUDA_ARCH__ >= 900
            if (!DETERMINISTIC && lane < 16) bulk_wait_read<0>();  // the previous dQ has left q_tile / do_tile
#endif
            __syncthreads();  // every warp is done with the previous Q, dO and dS^T
            load_tile<T, BWD_BLOCK, HEAD_DIM, BWD_THREADS, Rows>(q_tile, q, p.q_row_stride, m0, queries.len);
            load_tile<T, BWD_BLOCK, HEAD_DIM, BWD_THREADS, Rows>(do_tile, dout, g.dout_row_stride, m0, queries.len);
            cp_async_commit();
            stage_lse_delta<BWD_BLOCK>(lse_tile, delta_tile, lse, delta, m0, queries.len);
            cp_async_wait<0>();
            __syncthreads();

            // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x 64 queries.
            float s[N_BLOCKS * 4], dp[N_BLOCKS * 4];
#pragma unroll
            for (int e = 0; e < N_BLOCKS * 4; ++e) s[e] = dp[e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                unsigned ak[4], av[4];
                ldmatrix_x4(ak, k_a + kk * 32);
                ldmatrix_x4(av, v_a + kk * 32);
#pragma unroll
                for (int np = 0; np < N_BLOCKS / 2; ++np) {
                    unsigned bq[4], bo[4];
                    ldmatrix_x4(bq, q_b + np * 16 * ROW_BYTES + kk * 32);
                    ldmatrix_x4(bo, do_b + np * 16 * ROW_BYTES + kk * 32);
                    mma_16x16<T>(&s[8 * np], ak, bq);
                    mma_16x16<T>(&dp[8 * np], av, bo);
                }
            }
            // P^T and dS^T in place; masked elements become 0. Element masks
            // only where the pair of tiles crosses a mask edge or the keys' end
            // (query rows past the end have P = 0 through their lse).
            const bool crosses = pair_crosses_edge<BWD_BLOCK, BWD_BLOCK>(p, t, n0, m0);
            QueryRange seen_by[2] = {};  // the queries this thread's two keys see, where masks apply
            if (crosses) seen_by[0] = visible_queries(p, t, n0 + key_row), seen_by[1] = visible_queries(p, t, n0 + key_row + 8);
#pragma unroll
            for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 8 * j + 2 * (lane % 4) + e % 2;
                    const bool visible = !crosses || seen_by[e / 2].contains(m0 + c);
                    const float prob = visible ? fast_exp2(fmaf(s[4 * j + e], scale_log2, -lse_tile[c])) : 0.f;
                    s[4 * j + e] = prob;
                    dp[4 * j + e] = prob * (dp[4 * j + e] - delta_tile[c]);
                }
            // dV += P^T dO and dK += dS^T Q: A from registers, B transposed from shared memory.
#pragma unroll
            for (int kk = 0; kk < BWD_BLOCK / 16; ++kk) {
                unsigned ap[4], ads[4];
                p_fragment<T, N_BLOCKS>(s, kk, ap);
                p_fragment<T, N_BLOCKS>(dp, kk, ads);
#pragma unroll
                for (int dd = 0; dd < D_BLOCKS / 2; ++dd) {
                    unsigned bo[4], bq[4];
                    ldmatrix_x4_trans(bo, do_bt + kk * 16 * ROW_BYTES + dd * 32);
                    ldmatrix_x4_trans(bq, q_bt + kk * 16 * ROW_BYTES + dd * 32);
                    mma_16x16<T>(&dv[8 * dd], ap, bo);
                    mma_16x16<T>(&dk[8 * dd], ads, bq);
                }
            }
            // dS^T -> shared memory, rows = keys.
#pragma unroll
            for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    *(unsigned*)(ds_tile + (key_row + 8 * r) * DS_ROW_BYTES + (8 * j + 2 * (lane % 4)) * 2) =
                        pack2<T>(dp[4 * j + 2 * r], dp[4 * j + 2 * r + 1]);
            __syncthreads();

            // dQ (this warp's 16 query rows) = scale dS K, added to the accumulator.
            float dq[D_BLOCKS * 4];
#pragma unroll
            for (int e = 0; e < D_BLOCKS * 4; ++e) dq[e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BWD_BLOCK / 16; ++kk) {
                unsigned ads[4];
                ldmatrix_x4_trans(ads, ds_at + kk * 16 * DS_ROW_BYTES);
#pragma unroll
                for (int dd = 0; dd < D_BLOCKS / 2; ++dd) {
                    unsigned bk[4];
                    ldmatrix_x4_trans(bk, k_bt + kk * 16 * ROW_BYTES + dd * 32);
                    mma_16x16<T>(&dq[8 * dd], ads, bk);
                }
            }
            float* dq_rows = g.dq_accum + ((queries.start + m0 + warp * 16) * p.heads + h) * HEAD_DIM;
            const long long dq_row_stride = (long long)p.heads * HEAD_DIM;
            if (DETERMINISTIC) {
                // In key-tile order: wait for the turn of this tile among the key tiles that
                // reach this query tile, add, pass the turn on. Earlier key tiles come earlier
                // in the grid, so the tile waited for is running or done.
                int* turn = g.dq_turns + h * g.tiles_per_head + query_tile_slot(queries, b, m_tile);
                int mine = 0;
                for (int n = 0; n < n0; n += BWD_BLOCK) {
                    const QueryTiles earlier = query_tiles<BWD_BLOCK, BWD_BLOCK>(p, n, queries.len, t.diagonal);
                    mine += earlier.first <= m_tile && m_tile < earlier.end;
                }
                if (threadIdx.x == 0) while (load_acquire(turn) != mine) {}
                __syncthreads();
                add_dq<D_BLOCKS>(dq, dq_rows, dq_row_stride, queries.len - (m0 + warp * 16), (float)p.scale,
                                 [](float* at, float x, float y) {
                                     const float2 sum = __ldcg((float2*)at);  // from L2: another SM wrote it
                                     __stcg((float2*)at, make_float2(sum.x + x, sum.y + y));
                                 });
                __threadfence();
                __syncthreads();
                if (threadIdx.x == 0) atomicExch(turn, mine + 1);
                continue;
            }
            // the free Q / dO tiles stage it on sm_90
            add_dq_rows<D_BLOCKS>(dq, dq_rows, dq_row_stride, queries.len - (m0 + warp * 16), HEAD_DIM, (float)p.scale,
                                  (float*)q_tile + warp * 16 * (HEAD_DIM + 8), HEAD_DIM + 8);
        }
    }
#if __CUDA_ARCH__ >= 900
    if (!DETERMINISTIC && lane < 16) bulk_wait_read<0>();  // shared memory must outlive the copies' reads
#endif

    // dK * scale and dV for this warp's keys, once.
    store_dk_dv<T, D_BLOCKS>(p, g, keys, h_kv, n0 + key_row, HEAD_DIM, 0, dk, dv, (float)p.scale);
}
