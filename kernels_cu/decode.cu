// decode.cu — the decode backend: a few queries per sequence (at most 16)
// against long key/value caches, held as packed rows or in the pages of a
// paged cache, split over the keys (split-KV) so that a batch of a few long
// sequences still spreads over every SM.
//
// decode_plan (one CTA): each sequence's visible key tiles (DECODE_BLOCK_N
// keys; those its queries' masks leave, block_ranges.cuh: bound_keys), their
// total over the batch, and from it the key tiles of a split, one number for
// every sequence: about target_items CTAs in all (over key/value heads), at
// least MIN_SPLIT_TILES tiles a split and at most MAX_SPLITS splits a
// sequence. The splits are laid out longest sequence first (tile_plan.cuh:
// plan_tiles), and every count is read on the device, so the host never
// syncs and a captured graph replays with new lengths.
//
// decode_fwd, a CTA per (split, key/value head): its rows are the queries of
// the sequence times the query heads of the key/value head (packed GQA: row
// r is query r / G of head r % G of the group), so each key and value byte
// is read once for all of them. 4 warps: ROW_WARPS of them share the rows
// (M_SLICES m16 slices each) and the other 4 / ROW_WARPS split each key
// tile's columns; every warp keeps its own online softmax over its keys,
// and the warps' results are merged through shared memory at the end. K and
// V tiles stream through STAGES buffers by cp.async, every thread copying a
// part of every tile; keys past the sequence's length and keys of pages
// outside the pool are zero-filled and masked, so rows past seqused_k (and
// any NaN they hold) never reach an output, and a garbage page index is
// never read. A sequence of one split writes its output and lse itself; the
// splits of a longer one write their normalised output and lse (float32)
// to the workspace, and decode_combine (a warp per query and head) weighs
// them by exp(lse_s - lse). It also writes the rows of sequences that see no
// key: zeros, lse -inf.
//
// Tiles (backends/decode.py: STAGES, ROW_SHAPES): DECODE_BLOCK_N = 64 keys;
// STAGES buffers of K and V fill about 100 KB (two CTAs per SM) up to head
// dim 192, two buffers at 256; the row shapes 16, 32, 64 rows (and 128 at
// head dim 64) keep S and O in registers.
// resources: NVRTC 13.5, -Xptxas -v (tools/kernel_resources.py writes this table)
//   instance                          arch    registers  spill stores / loads  stack  shared: static + dynamic
//   decode_fwd<bf16_t, 64, 1, 1, 5>   sm_80          93               0 / 0 B    0 B  0 B + 92.2 KB
//   decode_fwd<bf16_t, 64, 1, 1, 5>   sm_90a         79               0 / 0 B    0 B  0 B + 92.2 KB
//   decode_fwd<bf16_t, 64, 2, 1, 5>   sm_80          96               0 / 0 B    0 B  0 B + 94.5 KB
//   decode_fwd<bf16_t, 64, 2, 1, 5>   sm_90a         96               0 / 0 B    0 B  0 B + 94.5 KB
//   decode_fwd<bf16_t, 64, 4, 1, 5>   sm_80         131               0 / 0 B    0 B  0 B + 99.0 KB
//   decode_fwd<bf16_t, 64, 4, 1, 5>   sm_90a        128               0 / 0 B    0 B  0 B + 99.0 KB
//   decode_fwd<bf16_t, 64, 4, 2, 5>   sm_80         227               0 / 0 B    0 B  0 B + 108.0 KB
//   decode_fwd<bf16_t, 64, 4, 2, 5>   sm_90a        226               0 / 0 B    0 B  0 B + 108.0 KB
//   decode_fwd<bf16_t, 96, 1, 1, 4>   sm_80         118               0 / 0 B    0 B  0 B + 107.2 KB
//   decode_fwd<bf16_t, 96, 1, 1, 4>   sm_90a        118               0 / 0 B    0 B  0 B + 107.2 KB
//   decode_fwd<bf16_t, 96, 2, 1, 4>   sm_80         128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<bf16_t, 96, 2, 1, 4>   sm_90a        126               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<bf16_t, 96, 4, 1, 4>   sm_80         158               0 / 0 B    0 B  0 B + 117.0 KB
//   decode_fwd<bf16_t, 96, 4, 1, 4>   sm_90a        133               0 / 0 B    0 B  0 B + 117.0 KB
//   decode_fwd<bf16_t, 128, 1, 1, 3>  sm_80         124               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<bf16_t, 128, 1, 1, 3>  sm_90a        124               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<bf16_t, 128, 2, 1, 3>  sm_80         128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<bf16_t, 128, 2, 1, 3>  sm_90a        128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<bf16_t, 128, 4, 1, 3>  sm_80         166               0 / 0 B    0 B  0 B + 119.0 KB
//   decode_fwd<bf16_t, 128, 4, 1, 3>  sm_90a        167               0 / 0 B    0 B  0 B + 119.0 KB
//   decode_fwd<bf16_t, 192, 1, 1, 2>  sm_80         162               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<bf16_t, 192, 1, 1, 2>  sm_90a        158               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<bf16_t, 192, 2, 1, 2>  sm_80         166               0 / 0 B    0 B  0 B + 112.5 KB
//   decode_fwd<bf16_t, 192, 2, 1, 2>  sm_90a        163               0 / 0 B    0 B  0 B + 112.5 KB
//   decode_fwd<bf16_t, 192, 4, 1, 2>  sm_80         215               0 / 0 B    0 B  0 B + 125.0 KB
//   decode_fwd<bf16_t, 192, 4, 1, 2>  sm_90a        222               0 / 0 B    0 B  0 B + 125.0 KB
//   decode_fwd<bf16_t, 256, 1, 1, 2>  sm_80         198               0 / 0 B    0 B  0 B + 140.2 KB
//   decode_fwd<bf16_t, 256, 1, 1, 2>  sm_90a        198               0 / 0 B    0 B  0 B + 140.2 KB
//   decode_fwd<bf16_t, 256, 2, 1, 2>  sm_80         239               0 / 0 B    0 B  0 B + 148.5 KB
//   decode_fwd<bf16_t, 256, 2, 1, 2>  sm_90a        238               0 / 0 B    0 B  0 B + 148.5 KB
//   decode_fwd<bf16_t, 256, 4, 1, 2>  sm_80         243               0 / 0 B    0 B  0 B + 165.0 KB
//   decode_fwd<bf16_t, 256, 4, 1, 2>  sm_90a        248               0 / 0 B    0 B  0 B + 165.0 KB
//   decode_fwd<half_t, 64, 1, 1, 5>   sm_80          93               0 / 0 B    0 B  0 B + 92.2 KB
//   decode_fwd<half_t, 64, 1, 1, 5>   sm_90a         79               0 / 0 B    0 B  0 B + 92.2 KB
//   decode_fwd<half_t, 64, 2, 1, 5>   sm_80          96               0 / 0 B    0 B  0 B + 94.5 KB
//   decode_fwd<half_t, 64, 2, 1, 5>   sm_90a         96               0 / 0 B    0 B  0 B + 94.5 KB
//   decode_fwd<half_t, 64, 4, 1, 5>   sm_80         131               0 / 0 B    0 B  0 B + 99.0 KB
//   decode_fwd<half_t, 64, 4, 1, 5>   sm_90a        128               0 / 0 B    0 B  0 B + 99.0 KB
//   decode_fwd<half_t, 64, 4, 2, 5>   sm_80         227               0 / 0 B    0 B  0 B + 108.0 KB
//   decode_fwd<half_t, 64, 4, 2, 5>   sm_90a        226               0 / 0 B    0 B  0 B + 108.0 KB
//   decode_fwd<half_t, 96, 1, 1, 4>   sm_80         118               0 / 0 B    0 B  0 B + 107.2 KB
//   decode_fwd<half_t, 96, 1, 1, 4>   sm_90a        118               0 / 0 B    0 B  0 B + 107.2 KB
//   decode_fwd<half_t, 96, 2, 1, 4>   sm_80         128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<half_t, 96, 2, 1, 4>   sm_90a        126               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<half_t, 96, 4, 1, 4>   sm_80         158               0 / 0 B    0 B  0 B + 117.0 KB
//   decode_fwd<half_t, 96, 4, 1, 4>   sm_90a        133               0 / 0 B    0 B  0 B + 117.0 KB
//   decode_fwd<half_t, 128, 1, 1, 3>  sm_80         124               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<half_t, 128, 1, 1, 3>  sm_90a        124               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<half_t, 128, 2, 1, 3>  sm_80         128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<half_t, 128, 2, 1, 3>  sm_90a        128               0 / 0 B    0 B  0 B + 110.5 KB
//   decode_fwd<half_t, 128, 4, 1, 3>  sm_80         166               0 / 0 B    0 B  0 B + 119.0 KB
//   decode_fwd<half_t, 128, 4, 1, 3>  sm_90a        167               0 / 0 B    0 B  0 B + 119.0 KB
//   decode_fwd<half_t, 192, 1, 1, 2>  sm_80         162               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<half_t, 192, 1, 1, 2>  sm_90a        158               0 / 0 B    0 B  0 B + 106.2 KB
//   decode_fwd<half_t, 192, 2, 1, 2>  sm_80         166               0 / 0 B    0 B  0 B + 112.5 KB
//   decode_fwd<half_t, 192, 2, 1, 2>  sm_90a        163               0 / 0 B    0 B  0 B + 112.5 KB
//   decode_fwd<half_t, 192, 4, 1, 2>  sm_80         215               0 / 0 B    0 B  0 B + 125.0 KB
//   decode_fwd<half_t, 192, 4, 1, 2>  sm_90a        222               0 / 0 B    0 B  0 B + 125.0 KB
//   decode_fwd<half_t, 256, 1, 1, 2>  sm_80         198               0 / 0 B    0 B  0 B + 140.2 KB
//   decode_fwd<half_t, 256, 1, 1, 2>  sm_90a        198               0 / 0 B    0 B  0 B + 140.2 KB
//   decode_fwd<half_t, 256, 2, 1, 2>  sm_80         239               0 / 0 B    0 B  0 B + 148.5 KB
//   decode_fwd<half_t, 256, 2, 1, 2>  sm_90a        238               0 / 0 B    0 B  0 B + 148.5 KB
//   decode_fwd<half_t, 256, 4, 1, 2>  sm_80         243               0 / 0 B    0 B  0 B + 165.0 KB
//   decode_fwd<half_t, 256, 4, 1, 2>  sm_90a        248               0 / 0 B    0 B  0 B + 165.0 KB
// end of resources
#include "block_ranges.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"
#include "tile_products.cuh"

#define DECODE_THREADS 128
#define DECODE_WARPS 4
#define DECODE_BLOCK_N 64
#define MIN_SPLIT_TILES 2
#define MAX_SPLITS 128
#define COMBINE_THREADS 256

// The decode kernels' own arguments (varattn/cuda/structs.py: DECODE_PARAMS).
struct DecodeParams {
    const int* block_table;   // (batch, table_stride) int32, or null: keys and values are rows of k and v
    float* o_partial;         // (items, rows_per_item, head_dim_v): each split's normalised output
    float* lse_partial;       // (items, rows_per_item)
    int* plan;                // order (batch), tile_offsets (batch + 1), positions (batch), tiles per split (1)
    int max_pages, table_stride;  // pages a sequence may have; elements between rows of block_table
    int page_shift, num_pages;    // page_size = 1 << page_shift; pages in the pool
    int target_items;         // about how many CTAs (over key/value heads) the splits should make
    int rows_per_item;        // rows of the workspace per CTA: max_seqlen_q times the query heads of a group
};

// Sequence b's keys: a span of k's rows, or of its pages (start 0).
__device__ __forceinline__ SeqSpan decode_keys(const AttnParams& p, const DecodeParams& d, int b) {
    if (d.block_table == nullptr) return key_span(p, b);
    const long long capacity = (long long)d.max_pages << d.page_shift;
    const long long used = max(p.seqused_k[b], 0);
    return {0, (int)min(min(used, capacity), (long long)p.max_seqlen_k)};
}

// Sequence b's queries and keys, and the key tiles they see, all heads together.
__device__ __forceinline__ void decode_tile(const AttnParams& p, const DecodeParams& d, int b, FlashTile& t) {
    t.b = b;
    t.m0 = 0;
    t.queries = query_span(p, b);
    t.keys = decode_keys(p, d, b);
    t.first_query = 0;
    t.last_row = t.queries.len - 1;
    bound_keys<DECODE_BLOCK_N>(p, t);
    if (t.queries.len == 0) t.end_tile = t.first_tile;
}

__device__ __forceinline__ int visible_tiles(const AttnParams& p, const DecodeParams& d, int b) {
    FlashTile t;
    decode_tile(p, d, b, t);
    return t.end_tile - t.first_tile;
}

__global__ void __launch_bounds__(PLAN_THREADS) decode_plan(const AttnParams p, const DecodeParams d) {
    int* order = d.plan;
    int* tile_offsets = order + p.batch;
    int* positions = tile_offsets + p.batch + 1;
    __shared__ int total, most;
    if (threadIdx.x == 0) total = most = 0;
    __syncthreads();
    int sum = 0, longest = 0;
    for (int b = threadIdx.x; b < p.batch; b += PLAN_THREADS) {
        const int tiles = visible_tiles(p, d, b);
        sum += tiles;
        longest = max(longest, tiles);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, offset));
    }
    if (threadIdx.x % 32 == 0) {
        atomicAdd(&total, sum);
        atomicMax(&most, longest);
    }
    __syncthreads();
    // At least work / target_items tiles a split: the host's grid, batch +
    // target_items / heads_kv splits per head, then covers every split.
    const long long work = (long long)total * p.heads_kv;
    const int per_split = max((int)max((long long)MIN_SPLIT_TILES, (work + d.target_items - 1) / d.target_items),
                              ceil_div(most, MAX_SPLITS));
    plan_tiles(p.batch, order, tile_offsets, [&](int b) { return visible_tiles(p, d, b); },
               [&](int b) { return ceil_div(visible_tiles(p, d, b), per_split); });
    __syncthreads();
    for (int pos = threadIdx.x; pos < p.batch; pos += PLAN_THREADS) positions[order[pos]] = pos;
    if (threadIdx.x == 0) positions[p.batch] = per_split;
}

template <typename T, int HEAD_DIM, int ROW_WARPS, int M_SLICES, int STAGES>
__global__ void __launch_bounds__(DECODE_THREADS) decode_fwd(const AttnParams p, const DecodeParams d) {
    constexpr int KEY_WARPS = DECODE_WARPS / ROW_WARPS;
    constexpr int ROWS = 16 * ROW_WARPS * M_SLICES;
    constexpr int WARP_KEYS = DECODE_BLOCK_N / KEY_WARPS;  // a warp's columns of each key tile
    constexpr int N_BLOCKS = WARP_KEYS / 8, D_BLOCKS = HEAD_DIM / 8;
    constexpr int CHUNK = 16 / sizeof(T), CHUNKS = HEAD_DIM / CHUNK;  // 16-byte pieces of a row
    static_assert(WARP_KEYS % 16 == 0, "a warp's keys make whole k16 steps of P V");
    using Layout = PaddedRows<T, HEAD_DIM>;
    constexpr int ROW_BYTES = Layout::ROW_BYTES, TILE_BYTES = DECODE_BLOCK_N * ROW_BYTES;
    constexpr int O_PITCH = HEAD_DIM + 4;  // floats a row of the merge's O

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    unsigned char* q_tile = shared_bytes;
    unsigned char* buffers = q_tile + ROWS * ROW_BYTES;  // STAGES x (K tile, V tile); then the merge

    const int* tile_offsets = d.plan + p.batch;
    const int h_kv = blockIdx.x % p.heads_kv, item = blockIdx.x / p.heads_kv;
    if (item >= tile_offsets[p.batch]) return;
    const int pos = plan_position(p, tile_offsets, item);
    const int b = d.plan[pos], split = item - tile_offsets[pos];
    const bool single = tile_offsets[pos + 1] - tile_offsets[pos] == 1;
    const int per_split = d.plan[3 * p.batch + 1];
    const int group = p.heads / p.heads_kv;
    FlashTile t;
    decode_tile(p, d, b, t);
    t.h_kv = h_kv;
    t.h = h_kv * group;
    const int first = t.first_tile + split * per_split, tiles = min(t.end_tile, first + per_split) - first;
    const int rows = t.queries.len * group;

    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += DECODE_THREADS) {
        const int r = c / CHUNKS, chunk = c % CHUNKS;
        const bool valid = r < rows;
        const T* source = (const T*)p.q + (t.queries.start + r / group) * p.q_row_stride
                          + (t.h + r % group) * p.q_head_stride + chunk * CHUNK;
        cp_async_16(q_tile + Layout::offset(r, chunk), valid ? source : (const T*)p.q, valid);
    }
    const int page_mask = (1 << d.page_shift) - 1;
    const int* table = d.block_table ? d.block_table + (long long)b * d.table_stride : nullptr;
    // K and V tile n_tile into buffer `slot`: a thread copies one chunk of every ROWS_PER_PASS-th key.
    auto load_keys = [&](int n_tile, int slot) {
        constexpr int ROWS_PER_PASS = DECODE_THREADS / CHUNKS;  // head_dim 96: some threads sit out
        if (threadIdx.x >= ROWS_PER_PASS * CHUNKS) return;
        unsigned char* k_tile = buffers + slot * 2 * TILE_BYTES;
        const int r0 = threadIdx.x / CHUNKS, chunk = threadIdx.x % CHUNKS;
#pragma unroll
        for (int pass = 0; pass < (DECODE_BLOCK_N + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++pass) {
            const int row = r0 + pass * ROWS_PER_PASS;
            if (DECODE_BLOCK_N % ROWS_PER_PASS != 0 && row >= DECODE_BLOCK_N) break;
            const int j = n_tile * DECODE_BLOCK_N + row;
            bool valid = j < t.keys.len;
            long long at = t.keys.start + j;
            if (d.block_table != nullptr) {
                const int page = valid ? table[j >> d.page_shift] : 0;
                valid = valid && page >= 0 && page < d.num_pages;
                at = ((long long)page << d.page_shift) + (j & page_mask);
            }
            const T* k = (const T*)p.k + at * p.k_row_stride + h_kv * p.k_head_stride + chunk * CHUNK;
            const T* v = (const T*)p.v + at * p.v_row_stride + h_kv * p.v_head_stride + chunk * CHUNK;
            cp_async_16(k_tile + Layout::offset(row, chunk), valid ? k : (const T*)p.k, valid);
            cp_async_16(k_tile + TILE_BYTES + Layout::offset(row, chunk), valid ? v : (const T*)p.v, valid);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < tiles) load_keys(first + s, s);
        cp_async_commit();  // group s: tile s (and Q with tile 0)
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_warp = warp % ROW_WARPS, key_warp = warp / ROW_WARPS;
    const float scale_log2 = (float)p.scale * LOG2_E;
    const unsigned q_lane = smem_address(q_tile + (row_warp * 16 + lane % 16) * ROW_BYTES + (lane / 16) * 16);
    const int warp_key0 = key_warp * WARP_KEYS;
    const unsigned k_lane = smem_address(buffers + (warp_key0 + lane % 8 + (lane / 16) * 8) * ROW_BYTES
                                         + ((lane / 8) % 2) * 16);
    const unsigned v_lane = smem_address(buffers + TILE_BYTES + (warp_key0 + lane % 8 + ((lane / 8) % 2) * 8) * ROW_BYTES
                                         + (lane / 16) * 16);
    auto first_row = [&](int ms) { return (ms * ROW_WARPS + row_warp) * 16 + lane / 4; };

    float o[M_SLICES][D_BLOCKS * 4], row_max[M_SLICES][2], row_sum[M_SLICES][2];
    start_rows(o, row_max, row_sum);

    for (int i = 0; i < tiles; ++i) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile i is in, and every warp is done with tile i - 1's buffer
        if (i + STAGES - 1 < tiles) load_keys(first + i + STAGES - 1, (i + STAGES - 1) % STAGES);
        cp_async_commit();
        const unsigned slot = (i % STAGES) * 2 * TILE_BYTES;
        const int n0 = (first + i) * DECODE_BLOCK_N + warp_key0;  // this warp's first key

        float s[M_SLICES][N_BLOCKS * 4];
        scores_qk<T, M_SLICES, N_BLOCKS, HEAD_DIM, ROW_BYTES, ROW_WARPS * 16 * ROW_BYTES>(s, q_lane, k_lane + slot);
        if (crosses_edge<WARP_KEYS>(p, t, n0)) {
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) mask_scores<N_BLOCKS>(p, t, first_row(ms), n0, s[ms], group);
        }
        if (d.block_table != nullptr) {  // keys of a page outside the pool take no part
#pragma unroll
            for (int np = 0; np < N_BLOCKS / 2; ++np) {
                const int j = n0 + 16 * np;  // 16 keys of one page (page_size >= 16)
                const int page = j < t.keys.len ? table[j >> d.page_shift] : 0;
                if (page < 0 || page >= d.num_pages) {
#pragma unroll
                    for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
                        for (int e = 0; e < 8; ++e) s[ms][8 * np + e] = neg_inf<float>();
                }
            }
        }
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms) {
            float rescale[2];
            softmax_scores<N_BLOCKS>(s[ms], row_max[ms], row_sum[ms], scale_log2, rescale);
            rescale_rows<D_BLOCKS>(o[ms], rescale);
        }
        add_pv<T, M_SLICES, N_BLOCKS, D_BLOCKS, ROW_BYTES>(o, s, v_lane + slot);
    }

    // The warps' (max, sum, O) of each row, into shared memory over the buffers.
    cp_async_wait<0>();
    __syncthreads();
    float* max_of = (float*)buffers;              // [KEY_WARPS][ROWS]
    float* sum_of = max_of + KEY_WARPS * ROWS;    // [KEY_WARPS][ROWS]
    float* o_of = sum_of + KEY_WARPS * ROWS;      // [KEY_WARPS][ROWS][O_PITCH]
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = first_row(ms) + 8 * r, at = key_warp * ROWS + row;
            float sum = row_sum[ms][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (lane % 4 == 0) {
                max_of[at] = row_max[ms][r];
                sum_of[at] = sum;
            }
#pragma unroll
            for (int j = 0; j < D_BLOCKS; ++j)
                *(float2*)(o_of + at * O_PITCH + 8 * j + 2 * (lane % 4)) = make_float2(o[ms][4 * j + 2 * r],
                                                                                       o[ms][4 * j + 2 * r + 1]);
        }
    __syncthreads();

    // Merged, a pair of columns per thread at a time: out and lse, or this split's part of them.
    for (int e = threadIdx.x; e < rows * (HEAD_DIM / 2); e += DECODE_THREADS) {
        const int row = e / (HEAD_DIM / 2), c = 2 * (e % (HEAD_DIM / 2));
        float top = neg_inf<float>();
#pragma unroll
        for (int w = 0; w < KEY_WARPS; ++w) top = fmaxf(top, max_of[w * ROWS + row]);
        float sum = 0.f, x = 0.f, y = 0.f;
#pragma unroll
        for (int w = 0; w < KEY_WARPS; ++w) {
            const float m = max_of[w * ROWS + row];
            const float weight = m == neg_inf<float>() ? 0.f : fast_exp2((m - top) * scale_log2);
            const float* o_row = o_of + (w * ROWS + row) * O_PITCH + c;
            sum += sum_of[w * ROWS + row] * weight;
            x += o_row[0] * weight;
            y += o_row[1] * weight;
        }
        const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
        const float lse = sum > 0.f ? top * (float)p.scale + __logf(sum) : neg_inf<float>();
        const long long query = t.queries.start + row / group;
        const int head = t.h + row % group;
        if (single) {
            store2<T>((T*)p.out + query * p.out_row_stride + head * p.out_head_stride + c, x * inv_sum, y * inv_sum);
            if (c == 0 && p.lse) ((float*)p.lse)[head * p.total_q + query] = lse;
        } else {
            const long long at = (long long)blockIdx.x * d.rows_per_item + row;
            *(float2*)(d.o_partial + at * HEAD_DIM + c) = make_float2(x * inv_sum, y * inv_sum);
            if (c == 0) d.lse_partial[at] = lse;
        }
    }
}

// The output and lse of query row (token) `row`, head h, from its sequence's
// splits, where it has other than one; a warp each.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(COMBINE_THREADS) decode_combine(const AttnParams p, const DecodeParams d) {
    constexpr int PER_LANE = HEAD_DIM / 32;
    const long long task = ((long long)blockIdx.x * COMBINE_THREADS + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (task >= p.total_q * p.heads) return;
    const long long row = task / p.heads;
    const int h = (int)(task % p.heads);
    const int b = sequence_of(p.cu_seqlens_q, p.batch, row);
    if (b < 0) return;
    const SeqSpan queries = query_span(p, b);
    const long long i = row - queries.start;
    if (i >= queries.len) return;
    const int* tile_offsets = d.plan + p.batch;
    const int pos = d.plan[2 * p.batch + 1 + b];
    const int first = tile_offsets[pos], splits = tile_offsets[pos + 1] - first;
    if (splits == 1) return;  // decode_fwd wrote it
    const int group = p.heads / p.heads_kv, h_kv = h / group;
    const long long r = i * group + h % group;
    auto part = [&](int s) { return ((long long)(first + s) * p.heads_kv + h_kv) * d.rows_per_item + r; };
    float top = neg_inf<float>();
    for (int s = lane; s < splits; s += 32) top = fmaxf(top, d.lse_partial[part(s)]);
    for (int offset = 16; offset > 0; offset /= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
    float acc[PER_LANE], sum = 0.f;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) acc[e] = 0.f;
    for (int s = 0; s < splits; ++s) {
        const long long at = part(s);
        const float l = d.lse_partial[at];
        if (l == neg_inf<float>()) continue;
        const float weight = __expf(l - top);
        sum += weight;
        const float* o = d.o_partial + at * HEAD_DIM + lane;
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) acc[e] += o[32 * e] * weight;
    }
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    T* out = (T*)p.out + row * p.out_row_stride + h * p.out_head_stride + lane;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) out[32 * e] = from_acc<T>(acc[e] * inv_sum);
    if (lane == 0 && p.lse) ((float*)p.lse)[h * p.total_q + row] = sum > 0.f ? top + __logf(sum) : neg_inf<float>();
}
