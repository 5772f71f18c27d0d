// flash_common.cuh — what the flash forward kernels (flash_fwd.cu for sm80+,
// flash_fwd_hopper.cu for sm_90a) share: the tile plan, locating a CTA's
// tile, the key range a tile must visit and its masks, the online softmax on
// one thread's part of a score tile, and the epilogue.
//
// Register layout shared by both kernels: a thread holds, for each 16-row
// slice of the query tile, two rows (lane / 4 and lane / 4 + 8) and, per
// 8-column block j, two columns (8 j + 2 (lane % 4) + {0, 1}) of S and of O:
// element [4 j + 2 r + c] (mma.sync's m16n8 and wgmma's m64nN accumulators).
#pragma once
#include "attn_params.cuh"
#include "dtypes.cuh"
#include "mma.cuh"
#include "varlen.cuh"

#define PLAN_THREADS 256
#define PLAN_BUCKETS 32
#define LOG2_E 1.4426950408889634f

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// The plan: sequences ordered by key length, longest first (a counting sort on
// floor(log2 Lk)), and their query tiles laid out in that order. order[pos] is
// the sequence processed pos-th, tile_offsets[pos] its first tile. The forward
// grid covers ceil(total_q / BLOCK_M) + batch tiles (an upper bound the host
// knows without a sync) times heads; CTAs past tile_offsets[batch] exit.

__device__ __forceinline__ int length_bucket(const AttnParams& p, int b) {
    const int len = key_span(p, b).len;
    return len > 1 ? __clz(len) : PLAN_BUCKETS - 1;  // bucket 0: the longest
}

// Inclusive prefix sum over the block; every thread must call it.
__device__ int block_inclusive_scan(int x, int* warp_totals) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int d = 1; d < 32; d *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, x, d);
        if (lane >= d) x += y;
    }
    if (lane == 31) warp_totals[warp] = x;
    __syncthreads();
    for (int w = 0; w < warp; ++w) x += warp_totals[w];
    __syncthreads();
    return x;
}

// BY_KEYS: tiles of the keys instead (the backward's CTAs own key tiles).
template <int BLOCK_M, bool BY_KEYS = false>
__global__ void __launch_bounds__(PLAN_THREADS) flash_plan(const AttnParams p, int* order, int* tile_offsets) {
    __shared__ int bucket_next[PLAN_BUCKETS];
    __shared__ int warp_totals[PLAN_THREADS / 32];
    __shared__ int chunk_total;
    if (threadIdx.x < PLAN_BUCKETS) bucket_next[threadIdx.x] = 0;
    __syncthreads();
    for (int b = threadIdx.x; b < p.batch; b += PLAN_THREADS) atomicAdd(&bucket_next[length_bucket(p, b)], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int at = 0;
        for (int i = 0; i < PLAN_BUCKETS; ++i) {
            const int count = bucket_next[i];
            bucket_next[i] = at;
            at += count;
        }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < p.batch; b += PLAN_THREADS) order[atomicAdd(&bucket_next[length_bucket(p, b)], 1)] = b;
    __syncthreads();

    int carried = 0;
    if (threadIdx.x == 0) tile_offsets[0] = 0;
    for (int first = 0; first < p.batch; first += PLAN_THREADS) {
        const int pos = first + threadIdx.x;
        const int tiles = pos < p.batch ? ceil_div(BY_KEYS ? key_span(p, order[pos]).len : query_span(p, order[pos]).len, BLOCK_M) : 0;
        const int inclusive = block_inclusive_scan(tiles, warp_totals);
        if (pos < p.batch) tile_offsets[pos + 1] = carried + inclusive;
        if (threadIdx.x == PLAN_THREADS - 1) chunk_total = inclusive;
        __syncthreads();
        carried += chunk_total;
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------
// One CTA's work: query rows [m0, m0 + BLOCK_M) of sequence b, head h, and the
// key tiles [first_tile, end_tile) some of its rows may see.
struct FlashTile {
    int b, h, h_kv, m0, last_row;  // last_row: the tile's last query row that exists
    SeqSpan queries, keys;
    long long diagonal;           // key index on the diagonal of query 0
    bool bounded_right;
    long long right;              // largest key - query - diagonal seen, when bounded_right
    int first_tile, end_tile;
};

template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool locate_tile(const AttnParams& p, const int* order, const int* tile_offsets,
                                            FlashTile& t) {
    t.h = blockIdx.x % p.heads;
    const int tile = blockIdx.x / p.heads;
    if (tile >= tile_offsets[p.batch]) return false;
    int pos = 0;
    for (int hi = p.batch; hi - pos > 1;) {  // the last pos with tile_offsets[pos] <= tile
        const int mid = (pos + hi) / 2;
        if (tile_offsets[mid] <= tile) pos = mid; else hi = mid;
    }
    t.b = order[pos];
    t.m0 = (tile_offsets[pos + 1] - 1 - tile) * BLOCK_M;  // a sequence's costliest (last) tile first
    t.h_kv = t.h / (p.heads / p.heads_kv);
    t.queries = query_span(p, t.b);
    t.keys = key_span(p, t.b);
    t.last_row = min(t.m0 + BLOCK_M, t.queries.len) - 1;

    t.diagonal = p.lower_right ? (long long)t.keys.len - t.queries.len : 0;
    t.bounded_right = p.causal || p.window_right >= 0;
    t.right = p.causal ? (p.window_right >= 0 ? min(0, p.window_right) : 0) : p.window_right;
    long long key_end = t.keys.len, key_begin = 0;
    if (t.bounded_right) key_end = min(key_end, max(0LL, t.last_row + t.diagonal + t.right + 1));
    if (p.window_left >= 0) key_begin = max(0LL, t.m0 + t.diagonal - p.window_left);
    t.first_tile = (int)(key_begin / BLOCK_N);
    t.end_tile = key_end > key_begin ? ceil_div((int)key_end, BLOCK_N) : t.first_tile;
    return true;
}

// Does key tile [n0, n0 + BLOCK_N) need element masks (it crosses a mask edge
// or the end of the keys)? Interior tiles skip them.
template <int BLOCK_N>
__device__ __forceinline__ bool crosses_edge(const AttnParams& p, const FlashTile& t, int n0) {
    return n0 + BLOCK_N > t.keys.len
        || (t.bounded_right && (long long)n0 + BLOCK_N - 1 - t.m0 - t.diagonal > t.right)
        || (p.window_left >= 0 && (long long)n0 - t.last_row - t.diagonal < -(long long)p.window_left);
}

// Masks one thread's two rows of a score tile: row r (query i_r = first_row + 8 r)
// sees keys [begin, end); this thread's columns are n0 + 8 j + 2 (lane % 4) + c.
template <int N_BLOCKS>
__device__ __forceinline__ void mask_scores(const AttnParams& p, const FlashTile& t, int first_row, int n0,
                                            float (&s)[N_BLOCKS * 4]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long i = first_row + 8 * r;
        const long long column = n0 + 2 * (lane % 4);
        long long end = t.keys.len;
        if (t.bounded_right) end = min(end, i + t.diagonal + t.right + 1);
        const long long begin = p.window_left >= 0 ? i + t.diagonal - p.window_left : 0;
        const int lo = (int)max(-1LL, min((long long)N_BLOCKS * 8, begin - column));
        const int hi = (int)max(-1LL, min((long long)N_BLOCKS * 8, end - column));
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c)
                if (8 * j + c < lo || 8 * j + c >= hi) s[4 * j + 2 * r + c] = neg_inf<float>();
    }
}

// O = 0, and row max and sum as before any key, for every m16 slice of a thread's rows.
template <int M_SLICES, int O_ELEMENTS>
__device__ __forceinline__ void start_rows(float (&o)[M_SLICES][O_ELEMENTS], float (&row_max)[M_SLICES][2],
                                           float (&row_sum)[M_SLICES][2]) {
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms) {
#pragma unroll
        for (int e = 0; e < O_ELEMENTS; ++e) o[ms][e] = 0.f;
        row_max[ms][0] = row_max[ms][1] = neg_inf<float>();
        row_sum[ms][0] = row_sum[ms][1] = 0.f;
    }
}

// Online softmax over one score tile for this thread's two rows: the new row
// max (over the 4 lanes sharing a row), the row sums, S replaced by
// P = 2^(scale log2(e) (S - max)) (one FFMA and one exp2 per score; scale > 0,
// so the max of S gives the max of scale * S), and the factor by which O's
// rows must shrink (rescale_rows) before P V is added.
template <int N_BLOCKS>
__device__ __forceinline__ void softmax_scores(float (&s)[N_BLOCKS * 4], float (&row_max)[2], float (&row_sum)[2],
                                               float scale_log2, float (&rescale)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float m = row_max[r];
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j) m = fmaxf(m, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        const float base = m == neg_inf<float>() ? 0.f : m * scale_log2;  // a row that has seen nothing yet
        rescale[r] = fast_exp2(row_max[r] * scale_log2 - base);
        row_max[r] = m;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < N_BLOCKS; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float& x = s[4 * j + 2 * r + c];
                x = fast_exp2(fmaf(x, scale_log2, -base));
                sum += x;
            }
        row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
}

template <int D_BLOCKS>
__device__ __forceinline__ void rescale_rows(float (&o)[D_BLOCKS * 4], const float (&rescale)[2]) {
#pragma unroll
    for (int j = 0; j < D_BLOCKS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * j + e] *= rescale[e / 2];
}

// P's keys [16 k, 16 k + 16) as an A operand (mma.sync m16k16 layout).
template <typename T, int N_BLOCKS>
__device__ __forceinline__ void p_fragment(const float (&s)[N_BLOCKS * 4], int k, unsigned (&a)[4]) {
    a[0] = pack2<T>(s[8 * k], s[8 * k + 1]);
    a[1] = pack2<T>(s[8 * k + 2], s[8 * k + 3]);
    a[2] = pack2<T>(s[8 * k + 4], s[8 * k + 5]);
    a[3] = pack2<T>(s[8 * k + 6], s[8 * k + 7]);
}

// O * out_scale / l and lse = lse_scale * max + ln l for this thread's two
// rows (query first_row and first_row + 8), in the first `columns` columns;
// rows past the sequence are not written, nor lse when the caller needs none
// (p.lse null). lse_scale: what turns the running max into scores (p.scale
// where the softmax folds the scale in).
template <typename T, int D_BLOCKS>
__device__ __forceinline__ void write_rows(const AttnParams& p, const FlashTile& t, int first_row,
                                           const float (&o)[D_BLOCKS * 4], const float (&row_max)[2],
                                           float (&row_sum)[2], float lse_scale, float out_scale = 1.f,
                                           int columns = D_BLOCKS * 8) {
    const int lane = threadIdx.x % 32;
    float* lse = p.lse ? (float*)p.lse + t.h * p.total_q + t.queries.start : nullptr;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int i = first_row + 8 * r;
        if (i >= t.queries.len) continue;
        const float inv_sum = sum > 0.f ? out_scale / sum : 0.f;
        T* out = (T*)p.out + (t.queries.start + i) * p.out_row_stride + t.h * p.out_head_stride;
#pragma unroll
        for (int j = 0; j < D_BLOCKS; ++j)
            if (8 * j < columns) store2<T>(out + 8 * j + 2 * (lane % 4), o[4 * j + 2 * r] * inv_sum, o[4 * j + 2 * r + 1] * inv_sum);
        if (lse && lane % 4 == 0) lse[i] = sum > 0.f ? row_max[r] * lse_scale + __logf(sum) : neg_inf<float>();
    }
}

// ---------------------------------------------------------------------------
// Shared tiles of COLS elements per row, rows padded by 16 bytes, so that
// ldmatrix's eight row addresses (and the 32-bit kernels' LDS, efficient
// kernels) fall in distinct banks without a swizzle.
template <typename T, int COLS>
struct PaddedRows {
    static constexpr int PITCH = COLS + 16 / (int)sizeof(T);  // elements
    static constexpr int ROW_BYTES = PITCH * (int)sizeof(T);
    static __device__ __forceinline__ int offset(int row, int chunk) { return row * ROW_BYTES + chunk * 16; }
};

// ROWS x COLS elements from global rows [row0, row0 + ROWS) into a shared
// tile laid out by Layout::offset(row, chunk) (bytes; chunk = 16-byte column
// chunk); rows at or past `rows_valid`, and columns at or past `cols_valid`
// (a multiple of the chunk), become zeros. A thread copies one chunk of
// every ROWS_PER_PASS-th row, walking one pointer, so few registers stay
// live across the main loop.
template <typename T, int ROWS, int COLS, int THREADS, typename Layout>
__device__ __forceinline__ void load_tile(unsigned char* shared, const T* global, long long row_stride, int row0,
                                          int rows_valid, int cols_valid = COLS) {
    constexpr int CHUNK = 16 / sizeof(T);               // elements per chunk
    constexpr int CHUNKS = COLS / CHUNK;
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // head_dim 96: some threads sit out
    static_assert(ROWS_PER_PASS > 0, "a pass covers at least one row");
    if (threadIdx.x >= ROWS_PER_PASS * CHUNKS) return;
    const int r = threadIdx.x / CHUNKS, chunk = threadIdx.x % CHUNKS;
    const bool column_valid = chunk * CHUNK < cols_valid;
    const T* source = global + (long long)(row0 + r) * row_stride + chunk * CHUNK;
#pragma unroll
    for (int pass = 0; pass < (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++pass) {
        const int row = r + pass * ROWS_PER_PASS;
        if (ROWS % ROWS_PER_PASS != 0 && row >= ROWS) break;
        const bool valid = column_valid && row0 + row < rows_valid;
        cp_async_16(shared + Layout::offset(row, chunk), valid ? source : global, valid);
        source += ROWS_PER_PASS * row_stride;
    }
}
