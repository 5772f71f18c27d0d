// flash_fwd.cu — the flash backend's forward: tiled attention with an online
// softmax on tensor cores (mma.sync, sm80+), one pass over the keys.
//
// The algorithm, per CTA = (query tile of BLOCK_M rows, head, sequence):
//   1. Q tile -> shared memory (cp.async), resident for the whole pass.
//   2. For each key tile of BLOCK_N rows that some query of the tile may see
//      (tiles a causal or window mask wholly hides are never visited):
//      S = Q K^T on tensor cores; mask (only tiles that cross a mask edge or
//      the end of the keys pay for element masks); online softmax in base 2
//      with the scale folded into one FFMA per score (running row max m of S,
//      row sum l, O rescaled when m grows); O += P V with P taken straight
//      from S's registers. K and V are single-buffered and interleaved:
//      V(j) loads while S(j) is computed, K(j+1) during softmax and P(j) V(j).
//   3. O / l and lse = scale * m + ln l written once; a row that sees no key
//      writes 0 and -inf.
//
// Work distribution (tile_plan.cuh): flash_plan (one small CTA) orders the
// sequences by key length, longest first, and lays out their query tiles in
// that order, last tile (the costliest under a causal mask) of each sequence
// first. The 1-D grid covers an upper bound of the tile count known on the
// host, ceil(total_q / BLOCK_M) + batch, times heads (heads fastest, so a
// tile's heads run together and share K/V in L2); CTAs past the real count
// exit at once. No device->host sync, few idle CTAs, and the longest tiles
// start first on skewed batches. On sm_90a, flash_fwd_hopper.cu takes every
// head dim with wgmma instead (this kernel only where the copy engine cannot
// walk the tensors' strides).
//
// Tiles: 4 warps. A warp owns BLOCK_M / 4 query rows (one or two m16 slices),
// so each K/V fragment it reads from shared memory feeds all of its rows.
// Tiles (flash.py: MMA_SYNC; instance = <type, head_dim, BLOCK_M, BLOCK_N>):
// O takes BLOCK_M / 4 * HEAD_DIM / 32 fp32 registers per thread and S
// BLOCK_M / 4 * BLOCK_N / 32: at head_dim >= 96 the key tile shrinks to 32
// (BLOCK_N 64 spilled at 128) and past 128 the query tile to 64. Two CTAs per
// SM (launch bound), 8 warps.
// resources: NVRTC 13.5, -Xptxas -v (tools/kernel_resources.py writes this table)
//   instance                         arch    registers  spill stores / loads  stack  shared: static + dynamic
//   flash_fwd<bf16_t, 32, 128, 64>   sm_80         185               0 / 0 B    0 B  0 B + 20.0 KB
//   flash_fwd<bf16_t, 32, 128, 64>   sm_90a        194               0 / 0 B    0 B  0 B + 20.0 KB
//   flash_fwd<bf16_t, 64, 128, 64>   sm_80         238               0 / 0 B    0 B  0 B + 36.0 KB
//   flash_fwd<bf16_t, 64, 128, 64>   sm_90a        239               0 / 0 B    0 B  0 B + 36.0 KB
//   flash_fwd<bf16_t, 96, 128, 32>   sm_80         230               0 / 0 B    0 B  0 B + 39.0 KB
//   flash_fwd<bf16_t, 96, 128, 32>   sm_90a        239               0 / 0 B    0 B  0 B + 39.0 KB
//   flash_fwd<bf16_t, 128, 128, 32>  sm_80         255               0 / 0 B    0 B  0 B + 51.0 KB
//   flash_fwd<bf16_t, 128, 128, 32>  sm_90a        255               0 / 0 B    0 B  0 B + 51.0 KB
//   flash_fwd<bf16_t, 192, 64, 64>   sm_80         221               0 / 0 B    0 B  0 B + 75.0 KB
//   flash_fwd<bf16_t, 192, 64, 64>   sm_90a        231               0 / 0 B    0 B  0 B + 75.0 KB
//   flash_fwd<bf16_t, 256, 64, 64>   sm_80         249               0 / 0 B    0 B  0 B + 99.0 KB
//   flash_fwd<bf16_t, 256, 64, 64>   sm_90a        253               0 / 0 B    0 B  0 B + 99.0 KB
//   flash_fwd<half_t, 32, 128, 64>   sm_80         185               0 / 0 B    0 B  0 B + 20.0 KB
//   flash_fwd<half_t, 32, 128, 64>   sm_90a        194               0 / 0 B    0 B  0 B + 20.0 KB
//   flash_fwd<half_t, 64, 128, 64>   sm_80         238               0 / 0 B    0 B  0 B + 36.0 KB
//   flash_fwd<half_t, 64, 128, 64>   sm_90a        239               0 / 0 B    0 B  0 B + 36.0 KB
//   flash_fwd<half_t, 96, 128, 32>   sm_80         230               0 / 0 B    0 B  0 B + 39.0 KB
//   flash_fwd<half_t, 96, 128, 32>   sm_90a        239               0 / 0 B    0 B  0 B + 39.0 KB
//   flash_fwd<half_t, 128, 128, 32>  sm_80         255               0 / 0 B    0 B  0 B + 51.0 KB
//   flash_fwd<half_t, 128, 128, 32>  sm_90a        255               0 / 0 B    0 B  0 B + 51.0 KB
//   flash_fwd<half_t, 192, 64, 64>   sm_80         221               0 / 0 B    0 B  0 B + 75.0 KB
//   flash_fwd<half_t, 192, 64, 64>   sm_90a        231               0 / 0 B    0 B  0 B + 75.0 KB
//   flash_fwd<half_t, 256, 64, 64>   sm_80         249               0 / 0 B    0 B  0 B + 99.0 KB
//   flash_fwd<half_t, 256, 64, 64>   sm_90a        253               0 / 0 B    0 B  0 B + 99.0 KB
// end of resources
// Shared rows are padded by 16 bytes, so ldmatrix's eight row addresses fall
// in distinct banks for every head dim without a swizzle.
#include "block_ranges.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "tile_products.cuh"

#define FLASH_THREADS 128
#define FLASH_WARPS 4

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(FLASH_THREADS, 2)
flash_fwd(const AttnParams p, const int* order, const int* tile_offsets) {
    constexpr int M_SLICES = BLOCK_M / (16 * FLASH_WARPS);  // m16 slices per warp
    constexpr int N_BLOCKS = BLOCK_N / 8;                   // 8-column blocks of S
    constexpr int D_BLOCKS = HEAD_DIM / 8;                  // 8-column blocks of O
    using Layout = PaddedRows<T, HEAD_DIM>;
    constexpr int ROW_BYTES = Layout::ROW_BYTES;

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    unsigned char* q_tile = shared_bytes;
    unsigned char* k_tile = q_tile + BLOCK_M * ROW_BYTES;
    unsigned char* v_tile = k_tile + BLOCK_N * ROW_BYTES;

    FlashTile t;
    if (!locate_tile<BLOCK_M, BLOCK_N>(p, order, tile_offsets, blockIdx.x, t)) return;
    const T* q = (const T*)p.q + t.queries.start * p.q_row_stride + t.h * p.q_head_stride;
    const T* k = (const T*)p.k + t.keys.start * p.k_row_stride + t.h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + t.keys.start * p.v_row_stride + t.h_kv * p.v_head_stride;
    if (t.first_tile < t.end_tile) {
        load_tile<T, BLOCK_M, HEAD_DIM, FLASH_THREADS, Layout>(q_tile, q, p.q_row_stride, t.m0, t.queries.len);
        load_tile<T, BLOCK_N, HEAD_DIM, FLASH_THREADS, Layout>(k_tile, k, p.k_row_stride, t.first_tile * BLOCK_N, t.keys.len);
        cp_async_commit();
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float scale_log2 = (float)p.scale * LOG2_E;
    // Each lane's ldmatrix row address in the three tiles; the loops add
    // compile-time byte offsets to them.
    const unsigned q_lane = smem_address(q_tile + (warp * 16 + lane % 16) * ROW_BYTES + (lane / 16) * 16);
    const unsigned k_lane = smem_address(k_tile + (lane % 8 + (lane / 16) * 8) * ROW_BYTES + ((lane / 8) % 2) * 16);
    const unsigned v_lane = smem_address(v_tile + (lane % 8 + ((lane / 8) % 2) * 8) * ROW_BYTES + (lane / 16) * 16);
    auto first_row = [&](int ms) { return t.m0 + ms * 16 * FLASH_WARPS + warp * 16 + lane / 4; };

    float o[M_SLICES][D_BLOCKS * 4], row_max[M_SLICES][2], row_sum[M_SLICES][2];
    start_rows(o, row_max, row_sum);

    for (int n_tile = t.first_tile; n_tile < t.end_tile; ++n_tile) {
        const int n0 = n_tile * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K(n) is in, and every warp is done with V(n - 1)
        load_tile<T, BLOCK_N, HEAD_DIM, FLASH_THREADS, Layout>(v_tile, v, p.v_row_stride, n0, t.keys.len);
        cp_async_commit();

        // S = Q K^T
        float s[M_SLICES][N_BLOCKS * 4];
        scores_qk<T, M_SLICES, N_BLOCKS, HEAD_DIM, ROW_BYTES, 16 * FLASH_WARPS * ROW_BYTES>(s, q_lane, k_lane);
        if (crosses_edge<BLOCK_N>(p, t, n0)) {
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) mask_scores<N_BLOCKS>(p, t, first_row(ms), n0, s[ms]);
        }

        cp_async_wait<0>();
        __syncthreads();  // V(n) is in, and every warp is done with K(n)
        if (n_tile + 1 < t.end_tile) {
            load_tile<T, BLOCK_N, HEAD_DIM, FLASH_THREADS, Layout>(k_tile, k, p.k_row_stride, n0 + BLOCK_N, t.keys.len);
            cp_async_commit();
        }
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms) {
            float rescale[2];
            softmax_scores<N_BLOCKS>(s[ms], row_max[ms], row_sum[ms], scale_log2, rescale);
            rescale_rows<D_BLOCKS>(o[ms], rescale);
        }

        add_pv<T, M_SLICES, N_BLOCKS, D_BLOCKS, ROW_BYTES>(o, s, v_lane);
    }

#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms) write_rows<T, D_BLOCKS>(p, t, first_row(ms), o[ms], row_max[ms], row_sum[ms], (float)p.scale);
}
