// flash_fwd_hopper.cu — the flash forward on Hopper (sm_90a): the algorithm
// of flash_fwd.cu, with warpgroup matrix instructions (wgmma) in place of
// mma.sync and the copy engine (TMA) in place of cp.async, for head dims 32,
// 64, 96, 128, 192 and 256.
//
// A persistent grid: each CTA takes tiles of the plan (tile_plan.cuh) in
// turn, tile c, c + gridDim.x, ...; a tile = 64 x WARPGROUPS query rows of
// one head and sequence, or with PACKED (packed GQA) the rows of every query
// head of one key/value head's group, query-major (the Q copy's box spans
// the group's heads, and the group's size divides the tile's rows), so that a group's
// K and V are read once for all its heads. WARPGROUPS consumer warpgroups of
// 64 rows each, and one producer warpgroup.
//   Producer: one thread issues the bulk copies: a tile's Q once its buffer
//     is free, then each K and V tile (2 K and 3 V buffers, in use across
//     tiles) as soon as every consumer warp has released the buffer it goes
//     into; copies complete on mbarriers. So the next tile's Q and first K
//     and V arrive while the consumers finish a tile and write its output.
//     Its warpgroup keeps 24 registers and gives the rest to the consumers
//     (setmaxnreg), so they hold S, P and O without spilling.
//   Consumers, per key tile i: S(i) = Q K(i)^T with both operands read by
//     the tensor cores from 128-byte-swizzled shared memory (m64nBLOCK_Nk16),
//     issued together with O += P(i-1) V(i-1) (P from registers, V read
//     MN-major, m64nPV_Nk16); the masks and online softmax of S(i)
//     (block_ranges.cuh, softmax.cuh) run on the CUDA cores while the
//     tensor cores finish P(i-1) V(i-1); each warp releases K(i) and V(i-1)
//     once its wgmma reads are done. No CTA-wide barrier in the loop. Two warpgroups take turns
//     at issuing their products (two named barriers), so that the tensor
//     cores run one's while the other computes its softmax.
//   Then O / l and the LSE, once (store_rows). The consumers look up their
//     next tile (plan and sequence lengths, global loads) between issuing
//     the last P V and waiting for it. With STAGED_OUT a warpgroup whose 64
//     rows all belong to the sequence converts O / l into its own staging
//     tile (128-byte swizzled, conflict-free stores) and one thread has the
//     copy engine store it (cp.async.bulk.tensor), so that the global writes
//     overlap the next tile; the thread waits for the store to have read the
//     tile only before the next epilogue writes it again. The map of `out`
//     clips a box only at the tensor's end, and a box past a sequence's end
//     would overwrite the next sequence's rows: the warpgroup that crosses
//     the end (one per sequence) writes from registers (write_rows), as do
//     all where the host has no map of `out` (out_by_tma 0). Packed tiles
//     fit the same box as 64 / G queries x G heads, where G divides 64.
// Copies bring whole tiles, so rows past a sequence's end hold other data;
// the masks hide them from S, and the last V tile's are zeroed before P V.
// Head dims that are not a multiple of 64 (32, 96) fill their last swizzle
// atom's columns with the copy engine's zeros: S reads head_dim's columns
// only, P V runs over whole atoms (PV_N), and only head_dim columns are
// written.
//
// Tiles (BLOCK_M = 64 x WARPGROUPS; shared memory = Q + 2 K + 3 V tiles of
// whole atoms + 1 KB for alignment, + a 64-row staging tile per consumer
// warpgroup with STAGED_OUT; 2 / WARPGROUPS CTAs per SM), chosen by timing
// the candidates on the H200 (CHANGELOG has the numbers):
//   head_dim  32:  1 consumer warpgroup,  BLOCK_N 128  (64 measured the same)
//   head_dim  64:  1 consumer warpgroup,  BLOCK_N 128  (64 slower on W3, two warpgroups slower)
//   head_dim  96:  2 consumer warpgroups, BLOCK_N 128  (176, two V buffers, slower)
//   head_dim 128:  2 consumer warpgroups, BLOCK_N 128  (176 no faster on W1, slower on short sequences)
//   head_dim 192:  2 consumer warpgroups, BLOCK_N 64   (128 does not fit the shared memory)
//   head_dim 256:  2 consumer warpgroups, BLOCK_N 64   (likewise)
//   192, D_v 128:  2 consumer warpgroups, BLOCK_N 64   (128 with two V buffers within 4 %)
//   head_dim 128, every query sequence at most 64 rows (backends/flash.py:
//                  SHORT_QUERIES): 1 consumer warpgroup, BLOCK_N 64, two CTAs
//                  per SM (a 128-row tile would be half idle)
// The largest S that fits beside O in the consumers' registers; one
// warpgroup where two CTAs then share an SM (short sequences keep it busy).
// At head_dim 256 one consumer warpgroup does not build (ptxas wants 158
// registers at the m64n256 instruction, above the 128 of two CTAs per SM).
// STAGED_OUT where the staging tiles still let those CTAs share an SM
// (backends/flash.py: _wgmma): not at head_dim 256 (64 KB more would pass
// the 227 KB a CTA may have) nor for the short-query tiles (16 KB more:
// two CTAs, with the 1 KB the driver keeps for each, would need 192 bytes
// more than the SM's 228 KB; and their 64 rows are rarely all in a sequence).
// "registers" below is the launch's cap (65536 over the CTAs of an SM);
// after setmaxnreg the consumers have up to 240, the producer 24. The
// packed instances' spills are the producer's (its tile lookup divides by
// the group) and the consumers' per-tile setup, none in the key-tile loop.
// resources: NVRTC 13.5, -Xptxas -v (tools/kernel_resources.py writes this table)
//   instance                                                 arch    registers  spill stores / loads  stack  shared: static + dynamic
//   flash_fwd_hopper<bf16_t, 32, 32, 128, 1, false, true>    sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 32, 32, 128, 1, true, true>     sm_90a        128             48 / 48 B   40 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 64, 64, 128, 1, false, true>    sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 64, 64, 128, 1, true, true>     sm_90a        128             48 / 48 B   40 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 96, 96, 128, 2, false, true>    sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<bf16_t, 96, 96, 128, 2, true, true>     sm_90a        168             68 / 84 B   48 B  96 B + 225.0 KB
//   flash_fwd_hopper<bf16_t, 128, 128, 64, 1, false, false>  sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 128, 128, 64, 1, true, false>   sm_90a        128             68 / 84 B   48 B  96 B + 97.0 KB
//   flash_fwd_hopper<bf16_t, 128, 128, 128, 2, false, true>  sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<bf16_t, 128, 128, 128, 2, true, true>   sm_90a        168             68 / 84 B   48 B  96 B + 225.0 KB
//   flash_fwd_hopper<bf16_t, 192, 128, 64, 2, false, true>   sm_90a        168               0 / 0 B    0 B  96 B + 177.0 KB
//   flash_fwd_hopper<bf16_t, 192, 128, 64, 2, true, true>    sm_90a        168             68 / 84 B   40 B  96 B + 177.0 KB
//   flash_fwd_hopper<bf16_t, 192, 192, 64, 2, false, true>   sm_90a        168               0 / 0 B    0 B  96 B + 217.0 KB
//   flash_fwd_hopper<bf16_t, 192, 192, 64, 2, true, true>    sm_90a        168             76 / 92 B   48 B  96 B + 217.0 KB
//   flash_fwd_hopper<bf16_t, 256, 256, 64, 2, false, false>  sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<bf16_t, 256, 256, 64, 2, true, false>   sm_90a        168            84 / 100 B   48 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 32, 32, 128, 1, false, true>    sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 32, 32, 128, 1, true, true>     sm_90a        128             48 / 48 B   40 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 64, 64, 128, 1, false, true>    sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 64, 64, 128, 1, true, true>     sm_90a        128             48 / 48 B   40 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 96, 96, 128, 2, false, true>    sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 96, 96, 128, 2, true, true>     sm_90a        168             68 / 84 B   48 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 128, 128, 64, 1, false, false>  sm_90a        128               0 / 0 B    0 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 128, 128, 64, 1, true, false>   sm_90a        128             68 / 84 B   48 B  96 B + 97.0 KB
//   flash_fwd_hopper<half_t, 128, 128, 128, 2, false, true>  sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 128, 128, 128, 2, true, true>   sm_90a        168             68 / 84 B   48 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 192, 128, 64, 2, false, true>   sm_90a        168               0 / 0 B    0 B  96 B + 177.0 KB
//   flash_fwd_hopper<half_t, 192, 128, 64, 2, true, true>    sm_90a        168             68 / 84 B   40 B  96 B + 177.0 KB
//   flash_fwd_hopper<half_t, 192, 192, 64, 2, false, true>   sm_90a        168               0 / 0 B    0 B  96 B + 217.0 KB
//   flash_fwd_hopper<half_t, 192, 192, 64, 2, true, true>    sm_90a        168             76 / 92 B   48 B  96 B + 217.0 KB
//   flash_fwd_hopper<half_t, 256, 256, 64, 2, false, false>  sm_90a        168               0 / 0 B    0 B  96 B + 225.0 KB
//   flash_fwd_hopper<half_t, 256, 256, 64, 2, true, false>   sm_90a        168            84 / 100 B   48 B  96 B + 225.0 KB
// end of resources
#include "block_ranges.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

// Where a CTA's tiles and barriers live in shared memory. A CTA works
// through several tiles (the persistent loop below) and counts the key tiles
// it has visited over all of them: its g-th key tile (from 0) uses K buffer
// g % 2 and V buffer g % 3, and its j-th use of a buffer (j = g / buffers)
// completes phase j of the buffer's "full" barrier (the copy landed) and of
// its "free" barrier (every consumer warp is done reading it). The Q tile has
// one buffer, its u-th load completing phase u of q_full and q_free.
// Head dims that are not a multiple of 64 take whole swizzle atoms: the copy
// engine fills the columns past head_dim with zeros, S reads only head_dim's
// columns, and P V runs over the atoms' width (PV_N). With STAGED_OUT each
// consumer warpgroup has a staging tile for its 64 output rows after the V
// buffers (ATOMS_V atoms of 64 x 128 bytes), which the copy engine stores.
template <int HEAD_DIM_, int HEAD_DIM_V_, int BLOCK_N_, int WARPGROUPS_, bool STAGED_OUT_>
struct HopperShared {
    static constexpr int HEAD_DIM = HEAD_DIM_, HEAD_DIM_V = HEAD_DIM_V_, BLOCK_N = BLOCK_N_;
    static constexpr int WARPGROUPS = WARPGROUPS_, K_BUFFERS = 2, V_BUFFERS = 3;
    static constexpr bool STAGED_OUT = STAGED_OUT_;
    static constexpr int BLOCK_M = 64 * WARPGROUPS, CONSUMERS = 128 * WARPGROUPS;
    // 64-column swizzle atoms of Q and K, and of V, one copy each
    static constexpr int ATOMS = (HEAD_DIM + 63) / 64, ATOMS_V = (HEAD_DIM_V + 63) / 64;
    static constexpr int PV_N = 64 * ATOMS_V;
    static constexpr int Q_BYTES = BLOCK_M * ATOMS * 128, K_BYTES = BLOCK_N * ATOMS * 128;
    static constexpr int V_BYTES = BLOCK_N * ATOMS_V * 128, STAGING_BYTES = STAGED_OUT ? 64 * ATOMS_V * 128 : 0;
    // the dynamic shared memory the host launches with (backends/flash.py: _wgmma), 1 KB to align
    static constexpr int BYTES = Q_BYTES + K_BUFFERS * K_BYTES + V_BUFFERS * V_BYTES + WARPGROUPS * STAGING_BYTES + 1024;
    unsigned q, barriers;  // shared-space addresses: Q tile (1024-aligned), then K and V buffers; barriers

    __device__ unsigned k(int g) const { return q + Q_BYTES + (g % K_BUFFERS) * K_BYTES; }
    __device__ unsigned v(int g) const { return q + Q_BYTES + K_BUFFERS * K_BYTES + (g % V_BUFFERS) * V_BYTES; }
    __device__ unsigned staging(int group) const {
        return q + Q_BYTES + K_BUFFERS * K_BYTES + V_BUFFERS * V_BYTES + group * STAGING_BYTES;
    }
    __device__ unsigned q_full() const { return barriers; }
    __device__ unsigned q_free() const { return barriers + 8; }
    __device__ unsigned k_full(int g) const { return barriers + 8 * (2 + g % K_BUFFERS); }
    __device__ unsigned k_free(int g) const { return barriers + 8 * (2 + K_BUFFERS + g % K_BUFFERS); }
    __device__ unsigned v_full(int g) const { return barriers + 8 * (2 + 2 * K_BUFFERS + g % V_BUFFERS); }
    __device__ unsigned v_free(int g) const { return barriers + 8 * (2 + 2 * K_BUFFERS + V_BUFFERS + g % V_BUFFERS); }
    static constexpr int BARRIERS = 2 + 2 * K_BUFFERS + 2 * V_BUFFERS;
    static_assert(BYTES + 8 * BARRIERS <= 227 * 1024, "more shared memory than a CTA may have");

    __device__ void init() const {
        mbarrier_init(q_full(), 1);
        mbarrier_init(q_free(), CONSUMERS / 32);
        for (int i = 0; i < K_BUFFERS; ++i) mbarrier_init(k_full(i), 1), mbarrier_init(k_free(i), CONSUMERS / 32);
        for (int i = 0; i < V_BUFFERS; ++i) mbarrier_init(v_full(i), 1), mbarrier_init(v_free(i), CONSUMERS / 32);
        mbarrier_init_fence();
    }
};

// How many Q tiles and key tiles a CTA has gone through before its current
// tile: the buffers and barrier phases continue from there.
struct Visited {
    int q_tiles = 0, key_tiles = 0;

    __device__ void add(const FlashTile& t) {
        const int tiles = t.end_tile - t.first_tile;
        q_tiles += tiles > 0;
        key_tiles += tiles;
    }
};

// The producer: one thread copies Q once its buffer is free, then each K and
// V tile as soon as the consumers have freed its buffer; the next tile's
// copies start while the consumers finish the current one.
template <typename S>
__device__ __forceinline__ void produce(const FlashTile& t, const Visited& seen, const S& sm,
                                        const TensorMap& tma_q, const TensorMap& tma_k, const TensorMap& tma_v) {
    constexpr int BLOCK_N = S::BLOCK_N;
    const int tiles = t.end_tile - t.first_tile;
    const int q_row = t.queries.start + t.first_query, k_row = t.keys.start + t.first_tile * BLOCK_N;
    if (seen.q_tiles > 0) mbarrier_wait(sm.q_free(), (seen.q_tiles - 1) & 1);
    mbarrier_expect_bytes(sm.q_full(), S::Q_BYTES);
    for (int a = 0; a < S::ATOMS; ++a) tma_load(sm.q + a * S::BLOCK_M * 128, tma_q, 64 * a, t.h, q_row, sm.q_full());
    for (int i = 0; i < tiles; ++i) {
        const int g = seen.key_tiles + i;
        if (g >= S::K_BUFFERS) mbarrier_wait(sm.k_free(g), (g / S::K_BUFFERS - 1) & 1);
        mbarrier_expect_bytes(sm.k_full(g), S::K_BYTES);
        for (int a = 0; a < S::ATOMS; ++a)
            tma_load(sm.k(g) + a * BLOCK_N * 128, tma_k, 64 * a, t.h_kv, k_row + i * BLOCK_N, sm.k_full(g));
        if (g >= S::V_BUFFERS) mbarrier_wait(sm.v_free(g), (g / S::V_BUFFERS - 1) & 1);
        mbarrier_expect_bytes(sm.v_full(g), S::V_BYTES);
        for (int a = 0; a < S::ATOMS_V; ++a)
            tma_load(sm.v(g) + a * BLOCK_N * 128, tma_v, 64 * a, t.h_kv, k_row + i * BLOCK_N, sm.v_full(g));
    }
}

// A consumer warpgroup's output: O / l and the LSE (write_rows). Where the
// instance has staging tiles, the output map is usable and all 64 of the
// warpgroup's rows belong to the sequence, O goes through the staging tile:
// written there, fenced for the copy engine, stored by one thread as
// ATOMS_V boxes of 64 rows (packed: 64 / G queries x G heads, the same
// rows in the same order), and not waited for: the warpgroup goes on to its
// next tile, and waits for the store to have read the tile only before it
// writes the tile again. A box past a sequence's end would overwrite the next
// sequence's rows (the map clips at the tensor's end only), so a warpgroup
// whose rows cross the end (one per sequence and head at most) writes its
// rows from registers.
template <typename T, int D_BLOCKS, typename S>
__device__ __forceinline__ void store_rows(const AttnParams& p, const FlashTile& t, const S& sm, int group,
                                           int first_row, const float (&o)[D_BLOCKS * 4], const float (&row_max)[2],
                                           float (&row_sum)[2], int packed_heads, const TensorMap& tma_out,
                                           bool out_by_tma) {
    const int first = t.m0 + 64 * group;  // the warpgroup's first row
    if (!S::STAGED_OUT || !out_by_tma || first + 64 > t.queries.len * packed_heads) {
        write_rows<T, D_BLOCKS>(p, t, first_row, o, row_max, row_sum, (float)p.scale, 1.f, S::HEAD_DIM_V, packed_heads);
        return;
    }
    const bool issuer = threadIdx.x % 128 == 0;
    const unsigned staging = sm.staging(group);
    if (issuer) bulk_wait_read<0>();  // the previous tile's store is done reading the staging tile
    named_barrier_sync(4 + group, 128);
    write_rows<T, D_BLOCKS, true>(p, t, first_row, o, row_max, row_sum, (float)p.scale, 1.f, S::HEAD_DIM_V,
                                  packed_heads, staging);
    fence_proxy_async();
    named_barrier_sync(4 + group, 128);
    if (issuer) {
        const int row = (int)t.queries.start + first / packed_heads;
        for (int a = 0; a < S::ATOMS_V; ++a) tma_store(tma_out, staging + a * 64 * 128, 64 * a, t.h, row);
        bulk_commit();
    }
}

// A consumer warpgroup: its 64 query rows against every key tile, then the output.
// Rows are packed (FlashTile) when packed_heads > 1. locate_next() looks up
// the CTA's next tile: called once the last products are issued, so that
// its global loads wait while the tensor cores finish and the output is written.
// out_by_tma: the output may go through the staging tile and tma_out (store_rows).
template <typename T, typename S, typename LocateNext>
__device__ __forceinline__ void consume(const AttnParams& p, const FlashTile& t, const Visited& seen, const S& sm,
                                        int packed_heads, const TensorMap& tma_out, bool out_by_tma,
                                        LocateNext&& locate_next) {
    constexpr int HEAD_DIM = S::HEAD_DIM, BLOCK_N = S::BLOCK_N, WARPGROUPS = S::WARPGROUPS;
    constexpr int N_BLOCKS = BLOCK_N / 8, D_BLOCKS = S::PV_N / 8;
    const int tiles = t.end_tile - t.first_tile, g0 = seen.key_tiles;
    // group is broadcast from lane 0 so that ptxas knows a warp agrees on it:
    // the wgmma operands' addresses, which depend on it, are then computed in
    // uniform registers (where wgmma takes its descriptors), not per thread
    // and copied over.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = __shfl_sync(0xffffffffu, warp / 4, 0);
    const int first_row = t.m0 + 64 * group + 16 * (warp % 4) + lane / 4;
    const float scale_log2 = (float)p.scale * LOG2_E;
    const unsigned q_address = sm.q + group * 64 * 128;  // this warpgroup's 64 rows

    float o[D_BLOCKS * 4];
    float row_max[2] = {neg_inf<float>(), neg_inf<float>()}, row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) o[e] = 0.f;
    float s[N_BLOCKS * 4];
    unsigned pv[BLOCK_N / 16][4];  // P of the previous tile, the A operand of its P V

    // S = Q K^T: K-major operands, 16 of head_dim per instruction, 4 per
    // swizzle atom. Each instruction's descriptors are a tile's plus an
    // offset (one add, not a descriptor built from an address).
    const unsigned long long q_operand = wgmma_descriptor(q_address, 16, 1024);
    auto issue_s = [&](int g) {
        const unsigned long long k_operand = wgmma_descriptor(sm.k(g), 16, 1024);
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const unsigned step = (kk % 4) * 32;  // bytes into the swizzle atom
            WgmmaSS<T, BLOCK_N>::run(s, descriptor_plus(q_operand, (kk / 4) * S::BLOCK_M * 128 + step),
                                     descriptor_plus(k_operand, (kk / 4) * BLOCK_N * 128 + step), kk > 0);
        }
        wgmma_commit();
    };
    // O += P V: V MN-major, 16 keys (two 8-row groups of 1024 bytes) per
    // instruction; its head_dim atoms lie BLOCK_N * 128 bytes apart.
    auto issue_pv = [&](int g) {
        const unsigned long long v_operand = wgmma_descriptor(sm.v(g), BLOCK_N * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            WgmmaRS<T, S::PV_N>::run(o, pv[kk], descriptor_plus(v_operand, kk * 2048));
        wgmma_commit();
    };
    auto softmax = [&](int i, float (&rescale)[2]) {
        const int n0 = (t.first_tile + i) * BLOCK_N;
        if (crosses_edge<BLOCK_N>(p, t, n0)) mask_scores<N_BLOCKS>(p, t, first_row, n0, s, packed_heads);
        softmax_scores<N_BLOCKS>(s, row_max, row_sum, scale_log2, rescale);
    };
    auto keep_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) p_fragment<T, N_BLOCKS>(s, kk, pv[kk]);
    };
    auto release = [&](unsigned barrier) {  // this warp is done reading a buffer
        if (lane == 0) mbarrier_arrive(barrier);
    };
    auto scores_done = [&](int i) {  // S(i) has been read: its K buffer, and Q after the last one
        release(sm.k_free(g0 + i));
        if (i == tiles - 1) release(sm.q_free());
    };
    // Two warpgroups take turns at issuing their products (barriers 2 and 3:
    // "warpgroup w may issue"), so that one's softmax runs while the other's
    // products keep the tensor cores busy; the first warpgroup starts each
    // tile. Each hands the turn on after issuing, except the second one at its
    // last turn of a tile.
    const int turns = tiles + 1;
    int turn = 0;
    auto take_turn = [&]() {
        if (WARPGROUPS == 2) named_barrier_sync(2 + group, S::CONSUMERS);
    };
    auto pass_turn = [&]() {
        if (WARPGROUPS == 2 && (group == 0 || turn + 1 < turns)) named_barrier_arrive(2 + (1 - group), S::CONSUMERS);
        ++turn;
    };
    if (WARPGROUPS == 2 && group == 1 && tiles > 0) named_barrier_arrive(2, S::CONSUMERS);

    // Software pipeline: while the softmax of tile i runs on the CUDA cores,
    // the tensor cores compute P(i - 1) V(i - 1).
    if (tiles > 0) {
        mbarrier_wait(sm.q_full(), seen.q_tiles & 1);
        mbarrier_wait(sm.k_full(g0), (g0 / S::K_BUFFERS) & 1);
        take_turn();
        wgmma_fence();
        issue_s(g0);
        pass_turn();
        wgmma_wait<0>();
        fence_registers(s);
        scores_done(0);
        float rescale[2];
        softmax(0, rescale);
        keep_p();
        if (tiles > 1) mbarrier_wait(sm.k_full(g0 + 1), ((g0 + 1) / S::K_BUFFERS) & 1);  // K(i) is waited for a tile ahead
    }
    for (int i = 1; i < tiles; ++i) {
        const int g = g0 + i;
        mbarrier_wait(sm.v_full(g - 1), ((g - 1) / S::V_BUFFERS) & 1);
        take_turn();
        wgmma_fence();
        issue_s(g);
        issue_pv(g - 1);
        pass_turn();
        wgmma_wait<1>();  // S(i) done; P(i - 1) V(i - 1) may still run
        fence_registers(s);
        scores_done(i);
        float rescale[2];
        softmax(i, rescale);
        // K(i + 1) is waited for here rather than at the top of the next
        // turn, so that the wait's branch ends the softmax's basic block:
        // ptxas places a wgmma wait early in its block, ahead of arithmetic
        // that does not depend on it, so in the softmax's block the wait for
        // P(i - 1) V(i - 1) would come before the softmax and not overlap it.
        if (i + 1 < tiles) mbarrier_wait(sm.k_full(g + 1), ((g + 1) / S::K_BUFFERS) & 1);
        wgmma_wait<0>();
        fence_registers(o);
        fence_registers(pv);
        release(sm.v_free(g - 1));
        rescale_rows<D_BLOCKS>(o, rescale);
        keep_p();
    }
    if (tiles > 0) {
        const int last = g0 + tiles - 1;
        mbarrier_wait(sm.v_full(last), (last / S::V_BUFFERS) & 1);
        // Copies bring whole tiles: rows past the sequence's keys hold another
        // sequence or unused memory, and P = 0 there would not cancel a NaN.
        // Only the last tile can have such rows; they become zeros first.
        const int valid = t.keys.len - (t.end_tile - 1) * BLOCK_N;
        if (valid < BLOCK_N) {
            zero_rows_from<BLOCK_N, S::ATOMS_V, S::CONSUMERS>(sm.v(last), valid);
            fence_proxy_async();
            named_barrier_sync(1, S::CONSUMERS);
        }
        take_turn();
        wgmma_fence();
        issue_pv(last);
        pass_turn();
    }
    locate_next();
    if (tiles > 0) {
        wgmma_wait<0>();
        fence_registers(o);
        release(sm.v_free(g0 + tiles - 1));
    }
    store_rows<T, D_BLOCKS>(p, t, sm, group, first_row, o, row_max, row_sum, packed_heads, tma_out, out_by_tma);
}

// Registers per thread after the split (multiples of 8): the producer keeps
// few; the consumers take the rest of what the CTA got at launch, the pool
// setmaxnreg draws from (an increase past it would wait for ever).
constexpr int PRODUCER_REGISTERS = 24;

// 65536 registers per SM over 2 / WARPGROUPS CTAs of WARPGROUPS + 1 warpgroups.
template <int WARPGROUPS>
__host__ __device__ constexpr int consumer_registers() {
    constexpr int threads = 128 * (WARPGROUPS + 1), launched = 65536 / (2 / WARPGROUPS) / threads / 8 * 8;
    constexpr int share = (launched * threads / 128 - PRODUCER_REGISTERS) / WARPGROUPS / 8 * 8;
    return share > 240 ? 240 : share;
}

// Persistent: CTA c works on tiles c, c + gridDim.x, ... of the plan (heads
// fastest, the longest sequences' costliest tiles first) until they run out,
// so that the producer copies a tile's first operands while the consumers
// finish the tile before. A grid with a CTA per tile runs each tile once.
template <typename T, int HEAD_DIM, int HEAD_DIM_V, int BLOCK_N, int WARPGROUPS, bool PACKED, bool STAGED_OUT>
__global__ void __launch_bounds__(128 * (WARPGROUPS + 1), 2 / WARPGROUPS)
flash_fwd_hopper(const AttnParams p, const int* order, const int* tile_offsets, const __grid_constant__ TensorMap tma_q,
                 const __grid_constant__ TensorMap tma_k, const __grid_constant__ TensorMap tma_v,
                 const __grid_constant__ TensorMap tma_out, int out_by_tma) {
    using S = HopperShared<HEAD_DIM, HEAD_DIM_V, BLOCK_N, WARPGROUPS, STAGED_OUT>;
    constexpr int CONSUMER_REGISTERS = consumer_registers<WARPGROUPS>();
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) unsigned long long barriers[S::BARRIERS];
    S sm;
    sm.q = smem_address(shared_raw) + (1024 - smem_address(shared_raw) % 1024) % 1024;  // swizzle atoms: 1024-aligned
    sm.barriers = smem_address(barriers);

    if (blockIdx.x / (PACKED ? p.heads_kv : p.heads) >= tile_offsets[p.batch]) return;  // no tile for this CTA
    if (threadIdx.x == 0) {
        unsigned dynamic_bytes;
        asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dynamic_bytes));
        if (dynamic_bytes < S::BYTES) __trap();  // launched with less than the layout needs (backends/flash.py: _wgmma)
        sm.init();
    }
    __syncthreads();
    FlashTile t;
    Visited seen;
    if (threadIdx.x >= S::CONSUMERS) {
        set_max_registers_dec<PRODUCER_REGISTERS>();
        if (threadIdx.x != S::CONSUMERS) return;
        for (int work = blockIdx.x; locate_tile<S::BLOCK_M, BLOCK_N, PACKED>(p, order, tile_offsets, work, t);
             work += gridDim.x) {
            if (t.end_tile > t.first_tile) produce(t, seen, sm, tma_q, tma_k, tma_v);
            seen.add(t);
        }
    } else {
        set_max_registers_inc<CONSUMER_REGISTERS>();
        int work = blockIdx.x;
        bool more = locate_tile<S::BLOCK_M, BLOCK_N, PACKED>(p, order, tile_offsets, work, t);
        while (more) {
            FlashTile next;
            consume<T>(p, t, seen, sm, packed_heads<PACKED>(p), tma_out, out_by_tma != 0, [&] {
                more = locate_tile<S::BLOCK_M, BLOCK_N, PACKED>(p, order, tile_offsets, work + gridDim.x, next);
            });
            seen.add(t);
            work += gridDim.x;
            if (more) t = next;
        }
        // The last stores must have read their staging tile before the CTA's
        // shared memory goes; waiting for their writes costs nothing more here.
        if (STAGED_OUT && threadIdx.x % 128 == 0) bulk_wait<0>();
    }
}
