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
// Work distribution: flash_plan (one small CTA) orders the sequences by key
// length, longest first (a counting sort on floor(log2 Lk)), and lays out their
// query tiles in that order, last tile (the costliest under a causal mask) of
// each sequence first. flash_fwd's 1-D grid covers an upper bound of the tile
// count known on the host, ceil(total_q / BLOCK_M) + batch, times heads (heads
// fastest, so a tile's heads run together and share K/V in L2); CTAs past the
// real count exit at once. No device->host sync, few idle CTAs, and the
// longest tiles start first on skewed batches.
//
// Tiles: 4 warps. A warp owns BLOCK_M / 4 query rows (one or two m16 slices),
// so each K/V fragment it reads from shared memory feeds all of its rows.
//   head_dim  32:  BLOCK_M 128, BLOCK_N 64
//   head_dim  64:  BLOCK_M 128, BLOCK_N 64
//   head_dim  96:  BLOCK_M 128, BLOCK_N 64
//   head_dim 128:  BLOCK_M 128, BLOCK_N 64   (S 64 + O 128 fp32 registers per thread)
//   head_dim 192:  BLOCK_M 64,  BLOCK_N 64   (O would not fit in registers at 128 rows)
//   head_dim 256:  BLOCK_M 64,  BLOCK_N 64
// Shared rows are padded by 16 bytes, so ldmatrix's eight row addresses fall
// in distinct banks for every head dim without a swizzle.
// Resource use per instance (nvcc 13.0 -Xptxas -v, sm_80 / sm_90a): see the
// table at the end of this file.
#include "attn_params.cuh"
#include "dtypes.cuh"
#include "mma.cuh"
#include "varlen.cuh"

#define FLASH_THREADS 128
#define FLASH_WARPS 4
#define PLAN_THREADS 256
#define PLAN_BUCKETS 32
#define LOG2_E 1.4426950408889634f

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Longest keys first: bucket 0 holds lengths >= 2^31, bucket 31 lengths 0 and 1.
__device__ __forceinline__ int length_bucket(const AttnParams& p, int b) {
    const int len = key_span(p, b).len;
    return len > 1 ? __clz(len) : PLAN_BUCKETS - 1;
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

// order[pos]: the sequence processed pos-th; tile_offsets[pos]: its first tile.
template <int BLOCK_M>
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
        const int tiles = pos < p.batch ? ceil_div(query_span(p, order[pos]).len, BLOCK_M) : 0;
        const int inclusive = block_inclusive_scan(tiles, warp_totals);
        if (pos < p.batch) tile_offsets[pos + 1] = carried + inclusive;
        if (threadIdx.x == PLAN_THREADS - 1) chunk_total = inclusive;
        __syncthreads();
        carried += chunk_total;
        __syncthreads();
    }
}

// ROWS x HEAD_DIM elements from global rows [row0, row0 + ROWS) into a padded
// shared tile; rows at or past `rows_valid` become zeros. A thread copies one
// 16-byte column chunk of every ROWS_PER_PASS-th row, walking one pointer, so
// few registers stay live across the main loop.
template <typename T, int ROWS, int HEAD_DIM, int PITCH>
__device__ __forceinline__ void load_tile(T* shared, const T* global, long long row_stride, int row0, int rows_valid) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROWS_PER_PASS = FLASH_THREADS / CHUNKS;  // head_dim 96: 8 threads sit out
    if (threadIdx.x >= ROWS_PER_PASS * CHUNKS) return;
    const int r = threadIdx.x / CHUNKS, col = (threadIdx.x % CHUNKS) * 8;
    const T* source = global + (long long)(row0 + r) * row_stride + col;
#pragma unroll
    for (int pass = 0; pass < (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++pass) {
        const int row = r + pass * ROWS_PER_PASS;
        if (ROWS % ROWS_PER_PASS != 0 && row >= ROWS) break;
        const bool valid = row0 + row < rows_valid;
        cp_async_16(shared + row * PITCH + col, valid ? source : global, valid);
        source += ROWS_PER_PASS * row_stride;
    }
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N>
__global__ void __launch_bounds__(FLASH_THREADS, 2)
flash_fwd(const AttnParams p, const int* order, const int* tile_offsets) {
    constexpr int M_SLICES = BLOCK_M / (16 * FLASH_WARPS);  // m16 slices per warp
    constexpr int N_TILES = BLOCK_N / 8;                    // n8 tiles of S
    constexpr int D_TILES = HEAD_DIM / 8;                   // n8 tiles of O
    constexpr int PITCH = HEAD_DIM + 8;                     // +16 bytes per shared row

    extern __shared__ __align__(16) unsigned char shared_bytes[];
    T* q_tile = (T*)shared_bytes;
    T* k_tile = q_tile + BLOCK_M * PITCH;
    T* v_tile = k_tile + BLOCK_N * PITCH;

    // Which (sequence, query tile, head) this CTA computes.
    const int h = blockIdx.x % p.heads;
    const int tile = blockIdx.x / p.heads;
    if (tile >= tile_offsets[p.batch]) return;
    int pos = 0;
    for (int hi = p.batch; hi - pos > 1;) {  // the last pos with tile_offsets[pos] <= tile
        const int mid = (pos + hi) / 2;
        if (tile_offsets[mid] <= tile) pos = mid; else hi = mid;
    }
    const int b = order[pos];
    const int m_block = tile_offsets[pos + 1] - 1 - tile;  // costliest (last) tile first
    const SeqSpan queries = query_span(p, b), keys = key_span(p, b);
    const int m0 = m_block * BLOCK_M;
    const int h_kv = h / (p.heads / p.heads_kv);

    // The key range any row of this tile may see; whole tiles outside are skipped.
    const long long diagonal = p.lower_right ? (long long)keys.len - queries.len : 0;
    const bool bounded_right = p.causal || p.window_right >= 0;
    const long long right = p.causal ? (p.window_right >= 0 ? min(0, p.window_right) : 0) : p.window_right;
    const int last_row = min(m0 + BLOCK_M, queries.len) - 1;
    long long key_end = keys.len, key_begin = 0;
    if (bounded_right) key_end = min(key_end, max(0LL, last_row + diagonal + right + 1));
    if (p.window_left >= 0) key_begin = max(0LL, m0 + diagonal - p.window_left);
    const int first_tile = (int)(key_begin / BLOCK_N);
    const int end_tile = key_end > key_begin ? ceil_div((int)key_end, BLOCK_N) : first_tile;

    const T* q = (const T*)p.q + queries.start * p.q_row_stride + h * p.q_head_stride;
    const T* k = (const T*)p.k + keys.start * p.k_row_stride + h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + keys.start * p.v_row_stride + h_kv * p.v_head_stride;
    if (first_tile < end_tile) {
        load_tile<T, BLOCK_M, HEAD_DIM, PITCH>(q_tile, q, p.q_row_stride, m0, queries.len);
        load_tile<T, BLOCK_N, HEAD_DIM, PITCH>(k_tile, k, p.k_row_stride, first_tile * BLOCK_N, keys.len);
        cp_async_commit();
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float scale_log2 = (float)p.scale * LOG2_E;
    // Each lane's ldmatrix row address in the three tiles; the loops below add
    // compile-time offsets (bytes) to them.
    const unsigned q_lane = smem_address(q_tile + (warp * 16 + lane % 16) * PITCH + (lane / 16) * 8);
    const unsigned k_lane = smem_address(k_tile + (lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 8);
    const unsigned v_lane = smem_address(v_tile + (lane % 8 + ((lane / 8) % 2) * 8) * PITCH + (lane / 16) * 8);
    constexpr int ROW_BYTES = PITCH * sizeof(T);
    float o[M_SLICES][D_TILES][4];
    float row_max[M_SLICES][2], row_sum[M_SLICES][2];  // per thread: rows lane/4 and lane/4 + 8 of each slice
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms) {
#pragma unroll
        for (int dt = 0; dt < D_TILES; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[ms][dt][e] = 0.f;
        row_max[ms][0] = row_max[ms][1] = neg_inf<float>();
        row_sum[ms][0] = row_sum[ms][1] = 0.f;
    }

    for (int n_tile = first_tile; n_tile < end_tile; ++n_tile) {
        const int n0 = n_tile * BLOCK_N;
        cp_async_wait<0>();
        __syncthreads();  // K(n) is in, and every warp is done with V(n - 1)
        load_tile<T, BLOCK_N, HEAD_DIM, PITCH>(v_tile, v, p.v_row_stride, n0, keys.len);
        cp_async_commit();

        // S = Q K^T
        float s[M_SLICES][N_TILES][4];
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
            for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[ms][nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            unsigned a[M_SLICES][4];
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) ldmatrix_x4(a[ms], q_lane + ms * 16 * FLASH_WARPS * ROW_BYTES + kk * 32);
#pragma unroll
            for (int np = 0; np < N_TILES / 2; ++np) {
                unsigned bk[4];
                ldmatrix_x4(bk, k_lane + np * 16 * ROW_BYTES + kk * 32);
#pragma unroll
                for (int ms = 0; ms < M_SLICES; ++ms) {
                    mma_16816<T>(s[ms][2 * np], a[ms], bk[0], bk[1]);
                    mma_16816<T>(s[ms][2 * np + 1], a[ms], bk[2], bk[3]);
                }
            }
        }

        // Element masks only where the tile crosses an edge: row i sees keys [begin, end).
        const bool crosses_edge = n0 + BLOCK_N > keys.len
            || (bounded_right && (long long)n0 + BLOCK_N - 1 - m0 - diagonal > right)
            || (p.window_left >= 0 && (long long)n0 - last_row - diagonal < -(long long)p.window_left);
        if (crosses_edge) {
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const long long i = m0 + ms * 16 * FLASH_WARPS + warp * 16 + lane / 4 + r * 8;
                    const long long column = n0 + 2 * (lane % 4);  // of s[ms][0][2 * r]
                    long long end = keys.len;
                    if (bounded_right) end = min(end, i + diagonal + right + 1);
                    const long long begin = p.window_left >= 0 ? i + diagonal - p.window_left : 0;
                    const int lo = (int)max(-1LL, min((long long)BLOCK_N, begin - column));
                    const int hi = (int)max(-1LL, min((long long)BLOCK_N, end - column));
#pragma unroll
                    for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                        for (int c = 0; c < 2; ++c)
                            if (nt * 8 + c < lo || nt * 8 + c >= hi) s[ms][nt][2 * r + c] = neg_inf<float>();
                }
        }

        cp_async_wait<0>();
        __syncthreads();  // V(n) is in, and every warp is done with K(n)
        if (n_tile + 1 < end_tile) {
            load_tile<T, BLOCK_N, HEAD_DIM, PITCH>(k_tile, k, p.k_row_stride, n0 + BLOCK_N, keys.len);
            cp_async_commit();
        }

        // Online softmax in base 2 with the scale folded in (scale > 0, so the
        // row max of S gives the row max of scale * S): one FFMA and one exp2
        // per score; O and l are rescaled when the max grows.
#pragma unroll
        for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float m = row_max[ms][r];
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt) m = fmaxf(m, fmaxf(s[ms][nt][2 * r], s[ms][nt][2 * r + 1]));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                const float base = m == neg_inf<float>() ? 0.f : m * scale_log2;  // a row that has seen nothing yet
                const float rescale = fast_exp2(row_max[ms][r] * scale_log2 - base);
                row_max[ms][r] = m;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        s[ms][nt][2 * r + c] = fast_exp2(fmaf(s[ms][nt][2 * r + c], scale_log2, -base));
                        sum += s[ms][nt][2 * r + c];
                    }
                row_sum[ms][r] = row_sum[ms][r] * rescale + sum;
#pragma unroll
                for (int dt = 0; dt < D_TILES; ++dt) {
                    o[ms][dt][2 * r] *= rescale;
                    o[ms][dt][2 * r + 1] *= rescale;
                }
            }

        // O += P V: S's accumulator layout is the A-fragment layout of P.
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            unsigned a[M_SLICES][4];
#pragma unroll
            for (int ms = 0; ms < M_SLICES; ++ms) {
                a[ms][0] = pack2<T>(s[ms][2 * kk][0], s[ms][2 * kk][1]);
                a[ms][1] = pack2<T>(s[ms][2 * kk][2], s[ms][2 * kk][3]);
                a[ms][2] = pack2<T>(s[ms][2 * kk + 1][0], s[ms][2 * kk + 1][1]);
                a[ms][3] = pack2<T>(s[ms][2 * kk + 1][2], s[ms][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D_TILES / 2; ++dp) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, v_lane + kk * 16 * ROW_BYTES + dp * 32);
#pragma unroll
                for (int ms = 0; ms < M_SLICES; ++ms) {
                    mma_16816<T>(o[ms][2 * dp], a[ms], bv[0], bv[1]);
                    mma_16816<T>(o[ms][2 * dp + 1], a[ms], bv[2], bv[3]);
                }
            }
        }
    }

    // O / l and the log-sum-exp, once.
    float* lse = (float*)p.lse + h * p.total_q + queries.start;
#pragma unroll
    for (int ms = 0; ms < M_SLICES; ++ms)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = row_sum[ms][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const int i = m0 + ms * 16 * FLASH_WARPS + warp * 16 + lane / 4 + r * 8;
            if (i >= queries.len) continue;
            const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
            T* out = (T*)p.out + (queries.start + i) * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
            for (int dt = 0; dt < D_TILES; ++dt)
                *(unsigned*)(out + dt * 8 + 2 * (lane % 4)) =
                    pack2<T>(o[ms][dt][2 * r] * inv_sum, o[ms][dt][2 * r + 1] * inv_sum);
            if (lane % 4 == 0) lse[i] = sum > 0.f ? row_max[ms][r] * (float)p.scale + __logf(sum) : neg_inf<float>();
        }
}
