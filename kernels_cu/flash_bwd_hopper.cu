// flash_bwd_hopper.cu — the flash backward's main pass on Hopper (sm_90a):
// the algorithm of flash_bwd.cu with warpgroup matrix instructions (wgmma)
// and the copy engine (TMA), head dims 32, 64, 96 and 128, by default or
// deterministic (the same bits on every run; below). flash_bwd.cu's
// preprocess (delta) runs first and flash_bwd_hopper_dq (at the end of this
// file) last.
//
// Per CTA = (key tile of BLOCK_N = 128 keys, key/value head, sequence): two
// consumer warpgroups of 64 keys each, and one producer warpgroup.
//   Producer: one thread copies K and V once, then Q and dO of every query
//     tile (BLOCK_M rows) of every query head of the group into two stages,
//     each as soon as every consumer thread has released it; one warp writes
//     the tile's lse (log2-scaled; +inf where a row has no probability) and
//     delta beside it. Its warpgroup keeps 24 registers, the consumers take 240.
//   Consumers, per query tile, each on its 64 keys (keys as rows):
//     S^T = K Q^T, then dP^T = V dO^T           (operands in shared memory;
//                                                 P^T computed while dP^T runs)
//     P^T = exp2(S^T scale log2 e - lse), dS^T = P^T (dP^T - delta)
//     dV += P^T dO                              (P^T from registers; runs while
//                                                 dS^T goes to shared memory)
//     once both warpgroups' halves of dS^T are there:
//     dQ = dS K, a 64 x 64 block each           (dS and K read MN-major)
//     dK += dS^T Q                              (dS^T from registers)
//     and while dK runs, the warpgroup stages its block of dQ in the
//     accumulator's block layout (DqAccum) and one thread has the copy engine
//     add it to the float32 accumulator (one cp.reduce.async.bulk of 16 KB).
//   dK and dV stay in registers for the whole CTA (summed over the group's
//   query heads: no atomics for GQA), scaled and written once at the end.
//
// Deterministic mode (DETERMINISTIC). By default a query tile's dQ takes the
// key tiles' additions in whatever order they come. Here a counter per
// (query head, query-tile slot) (BwdParams::dq_turns, zeroed) counts the key
// tiles that have added, and a key tile adds when the count is its place in
// a fixed order. The consumers hand their staged blocks (barriers dq_full /
// dq_free) to a third producer warp, one thread of which, per step, waits
// for the turn (acquire), has the copy engine add both blocks, frees the
// staging once it is read, waits until the additions are complete (not just
// read) and passes the turn on (release, gpu scope); the consumers go on
// meanwhile, a step ahead at most.
//   The order: the key tiles of the sequence that reach the query tile, last
// to first where the mask bounds keys from the right (causal, right
// windows), each key tile walking its query tiles first to last; otherwise
// first to last, each walking them last to first (the mirror image). Then a
// key tile's first query tile is one that no key tile before it in the order
// reaches (under causal, the diagonal one), and the key tile before it
// reached each of its later query tiles a step earlier: at equal step times
// nobody waits. Where several key tiles reach all the same query tiles (no
// mask, or tiles clamped at the queries' start or end) no order avoids a
// wavefront: of k such tiles started together, the last adds k - 1 steps late.
//   No deadlock: the grid launches a sequence's key tiles in that order too
// (locate_key_tile's last_first), so a CTA waits only for CTAs of lower
// index. CTAs start in index order (as flash_bwd.cu's deterministic instance
// also assumes), so the lowest unfinished CTA is running and every turn it
// waits for comes: it finishes, and so on.
//   Masks: a key tile whose steps skip a query tile is not in that tile's
// order (key_tiles_seeing is query_tiles solved for the key tile: the two
// agree on who adds), and a block wholly past the queries' end is added by
// no key tile and takes no turn. At BLOCK_M 128 a step's two slots take one
// turn, the first slot's: the same key tiles add to both.
// Copies bring whole tiles: rows past the sequence's end hold other data,
// which could be Inf or NaN. Those rows of K, Q and dO are zeroed in shared
// memory before use (V's only meet masked probabilities). Where a pair of
// tiles crosses a mask edge or a sequence's end, masked elements of P^T and
// dS^T are then set to 0 by selects; the other pairs (most) take no branch
// or compare per element. Head dims that are not a multiple of 64 (32, 96)
// take whole 64-column swizzle atoms, as the forward does: the copy engine
// fills the columns past head_dim with zeros, S^T and dP^T read head_dim's
// columns only, dV, dK and dQ run over whole atoms (their extra columns are
// zeros) and only head_dim's columns are written.
//
// Tiles. BLOCK_N = 128 keys so that one K/V tile feeds two warpgroups, and
// BLOCK_M = 128 / atoms query rows, so that dQ of a step is two 64 x 64
// blocks, one per warpgroup, each a chain of m64n64 instructions over whole
// swizzle atoms (a block narrower than an atom would need a descriptor
// starting inside one):
//   head_dim 96, 128 (2 atoms): BLOCK_M 64, dQ split by head_dim's atoms.
//     Per thread dK, dV 64 + 64 fp32, S^T, dP^T 32 + 32 (m64n64): the
//     240 registers hold them with lse and delta loaded early, before the
//     products (once they run, their operand reads keep shared memory busy
//     and a load waits long). Shared memory: K, V (32 KB each), two stages
//     of Q and dO (16 KB each; a third stage measured no faster), two dS^T
//     buffers (16 KB each: one warpgroup may start the next tile while the
//     other still reads the last dS), dQ staging (16 KB per warpgroup), lse
//     and delta: 194 KB.
//   head_dim 32, 64 (1 atom): BLOCK_M 128, dQ split by query rows. dK, dV
//     are half as large (32 + 32 per thread), S^T and dP^T twice (64 + 64,
//     m64n128): as many accumulators as at 128. BLOCK_M 64 would need
//     32-column dQ blocks (inside an atom) or both warpgroups adding a
//     partial dQ; and a 128-row step has the barriers, lse loads and dQ
//     additions of a 64-row one for twice the work (chosen by that
//     reasoning, not yet timed against the alternatives). lse and delta (32
//     + 32 per thread) are loaded where they are used: held from before the
//     products, they made ptxas spill. Shared memory: K, V (16 KB each), Q
//     and dO (16 KB per stage each), dS^T (32 KB per buffer), dQ staging,
//     lse and delta: 195 KB.
//   192 and 256 are not here: dK and dV of 64 keys x 192 or 256 columns
//     (192 or 256 fp32 per thread) do not fit one warpgroup's registers
//     beside S^T and dP^T; they would need dK and dV split over the
//     warpgroups by columns, a different kernel.
// One CTA per SM; instance = <type, head_dim, deterministic>. Masked
// elements take a select, not a branch: the branches and their convergence
// barriers cost a quarter of the loop's instructions. "registers" below is
// the launch's cap; after setmaxnreg the consumers have 240, the producers
// (the deterministic mode's dQ thread among them) 24.
// resources: NVRTC 13.5, -Xptxas -v (tools/kernel_resources.py writes this table)
//   instance                              arch    registers  spill stores / loads  stack  shared: static + dynamic
//   flash_bwd_hopper<bf16_t, 32, false>   sm_90a        168               0 / 0 B    0 B  48 B + 195.0 KB
//   flash_bwd_hopper<bf16_t, 32, true>    sm_90a        168               0 / 0 B    0 B  80 B + 195.0 KB
//   flash_bwd_hopper<bf16_t, 64, false>   sm_90a        168               0 / 0 B    0 B  48 B + 195.0 KB
//   flash_bwd_hopper<bf16_t, 64, true>    sm_90a        168               0 / 0 B    0 B  80 B + 195.0 KB
//   flash_bwd_hopper<bf16_t, 96, false>   sm_90a        168               0 / 0 B    0 B  48 B + 194.0 KB
//   flash_bwd_hopper<bf16_t, 96, true>    sm_90a        168               0 / 0 B    0 B  80 B + 194.0 KB
//   flash_bwd_hopper<bf16_t, 128, false>  sm_90a        168               0 / 0 B    0 B  48 B + 194.0 KB
//   flash_bwd_hopper<bf16_t, 128, true>   sm_90a        168               0 / 0 B    0 B  80 B + 194.0 KB
//   flash_bwd_hopper<half_t, 32, false>   sm_90a        168               0 / 0 B    0 B  48 B + 195.0 KB
//   flash_bwd_hopper<half_t, 32, true>    sm_90a        168               0 / 0 B    0 B  80 B + 195.0 KB
//   flash_bwd_hopper<half_t, 64, false>   sm_90a        168               0 / 0 B    0 B  48 B + 195.0 KB
//   flash_bwd_hopper<half_t, 64, true>    sm_90a        168               0 / 0 B    0 B  80 B + 195.0 KB
//   flash_bwd_hopper<half_t, 96, false>   sm_90a        168               0 / 0 B    0 B  48 B + 194.0 KB
//   flash_bwd_hopper<half_t, 96, true>    sm_90a        168               0 / 0 B    0 B  80 B + 194.0 KB
//   flash_bwd_hopper<half_t, 128, false>  sm_90a        168               0 / 0 B    0 B  48 B + 194.0 KB
//   flash_bwd_hopper<half_t, 128, true>   sm_90a        168               0 / 0 B    0 B  80 B + 194.0 KB
// end of resources
#include "block_ranges.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

// Tiles per head dim. K and V of BLOCK_N = 128 keys, 64 per consumer
// warpgroup; head_dim padded to whole 64-column swizzle atoms (WIDTH);
// BLOCK_M = 128 / ATOMS queries per step, so that dQ (BLOCK_M x WIDTH) is
// two 64 x 64 blocks, one per consumer warpgroup: head_dim's two atoms of 64
// rows (ATOMS 2), or the two 64-row halves of one atom (ATOMS 1).
template <int HEAD_DIM>
struct BwdHopperShared {
    static constexpr int ATOMS = (HEAD_DIM + 63) / 64, WIDTH = 64 * ATOMS;  // 64-column swizzle atoms, one copy each
    static constexpr int BLOCK_M = 128 / ATOMS, BLOCK_N = 128, CONSUMERS = 256, STAGES = 2, DS_BUFFERS = 2;
    static_assert(ATOMS <= 2, "dK and dV of 64 keys x WIDTH in one warpgroup's registers");
    static constexpr int KV_BYTES = BLOCK_N * WIDTH * 2, Q_BYTES = BLOCK_M * WIDTH * 2;
    static constexpr int DS_BYTES = BLOCK_N * BLOCK_M * 2;
    static constexpr int DQ_BYTES = 64 * 64 * 4;  // one warpgroup's block of dQ, float32
    static constexpr int ROWS_BYTES = 2 * BLOCK_M * 4;  // lse and delta of one stage
    // Byte offsets of the regions from base, in this order.
    static constexpr int Q_AT = 2 * KV_BYTES, DOUT_AT = Q_AT + STAGES * Q_BYTES, DS_AT = DOUT_AT + STAGES * Q_BYTES,
                         DQ_AT = DS_AT + DS_BUFFERS * DS_BYTES, ROWS_AT = DQ_AT + CONSUMERS / 128 * DQ_BYTES,
                         BYTES = ROWS_AT + STAGES * ROWS_BYTES;
    // Warpgroup wg's block of dQ: its first query row in the step's tile and its atom of head_dim.
    static __device__ __forceinline__ int dq_row0(int wg) { return ATOMS == 1 ? 64 * wg : 0; }
    static __device__ __forceinline__ int dq_atom(int wg) { return ATOMS == 1 ? 0 : wg; }
    unsigned base, barriers;  // shared-space addresses: the tiles (1024-aligned), the barriers

    __device__ unsigned k() const { return base; }
    __device__ unsigned v() const { return base + KV_BYTES; }
    __device__ unsigned q(int i) const { return base + Q_AT + (i % STAGES) * Q_BYTES; }
    __device__ unsigned dout(int i) const { return base + DOUT_AT + (i % STAGES) * Q_BYTES; }
    __device__ unsigned ds(int i) const { return base + DS_AT + (i % DS_BUFFERS) * DS_BYTES; }
    __device__ unsigned dq(int wg) const { return base + DQ_AT + wg * DQ_BYTES; }
    __device__ unsigned rows(int i) const { return base + ROWS_AT + (i % STAGES) * ROWS_BYTES; }
    // Step i (counted from 0) uses stage i % 2; its j-th use of a stage
    // (j = i / 2) completes phase j of the stage's "full" barrier (the copies
    // landed and the rows are written) and of its "free" barrier.
    __device__ unsigned kv_full() const { return barriers; }
    __device__ unsigned stage_full(int i) const { return barriers + 8 * (1 + i % STAGES); }
    __device__ unsigned stage_free(int i) const { return barriers + 8 * (1 + STAGES + i % STAGES); }
    static constexpr int BARRIERS = 1 + 2 * STAGES;
    // The deterministic mode's, per warpgroup wg: its block of dQ is staged
    // (step i completes phase i of "dq_full"), the writer has read it ("dq_free").
    __device__ unsigned dq_full(int wg) const { return barriers + 8 * (BARRIERS + wg); }
    __device__ unsigned dq_free(int wg) const { return barriers + 8 * (BARRIERS + 2 + wg); }
    static constexpr int DQ_BARRIERS = 4;

    __device__ void init(bool deterministic) const {
        mbarrier_init(kv_full(), 1);
        for (int i = 0; i < STAGES; ++i) mbarrier_init(stage_full(i), 1 + 32), mbarrier_init(stage_free(i), CONSUMERS);
        if (deterministic)
            for (int wg = 0; wg < 2; ++wg) mbarrier_init(dq_full(wg), 128), mbarrier_init(dq_free(wg), 1);
        mbarrier_init_fence();
    }
};

// The float32 dQ accumulator: per head, tiles_per_head slots of 64 query
// rows (query_tile_slot), each ATOMS blocks of 64 rows x 64 columns (head_dim's
// swizzle atoms), so that one bulk reduction adds a warpgroup's whole block.
// Rows of a slot past its sequence's end belong to no other sequence. Inside
// a block, 16-byte chunk k of row r sits at chunk k ^ 2 (r % 8): the staging
// stores of a warp (8 rows, float2 each) fall in distinct banks.
template <int ATOMS>
struct DqAccum {
    static constexpr int ROWS = 64, COLUMNS = 64;
    static __device__ __forceinline__ long long block(const BwdParams& g, int h, long long slot, int atom) {
        return ((h * g.tiles_per_head + slot) * ATOMS + atom) * (ROWS * COLUMNS);
    }
    static __device__ __forceinline__ int offset(int r, int c) {
        return r * COLUMNS + (((c / 4) ^ (2 * (r % 8))) * 4) + c % 4;
    }
};

// The steps of a CTA: every query tile that sees its keys, for every query
// head of its group, head by head; a head's tiles first to last, or last to
// first (`backward`: the deterministic mode where the first key tile adds
// first). A Step walks them in order (a division per step would cost more
// instructions than the step's masks).
struct BwdSteps {
    int first_tile, per_head, count;
    bool backward;
};
struct Step {
    int h, tile;  // query head, query tile
    __device__ Step(const KeyTile& t, int group, const BwdSteps& steps)
        : h(t.h_kv * group), tile(steps.backward ? steps.first_tile + steps.per_head - 1 : steps.first_tile) {}
    __device__ void next(const BwdSteps& steps) {
        if (steps.backward) {
            if (tile-- == steps.first_tile) tile = steps.first_tile + steps.per_head - 1, ++h;
        } else if (++tile == steps.first_tile + steps.per_head) {
            tile = steps.first_tile, ++h;
        }
    }
};

// The producer's copies, from one thread.
template <int HEAD_DIM>
__device__ __forceinline__ void produce_tiles(const AttnParams& p, const KeyTile& t, const BwdSteps& steps,
                                              const BwdHopperShared<HEAD_DIM>& sm, const TensorMap& tma_q,
                                              const TensorMap& tma_k, const TensorMap& tma_v, const TensorMap& tma_do) {
    using S = BwdHopperShared<HEAD_DIM>;
    const int group = p.heads / p.heads_kv, k_row = t.keys.start + t.n0;
    mbarrier_expect_bytes(sm.kv_full(), 2 * S::KV_BYTES);
    for (int a = 0; a < S::ATOMS; ++a) {
        tma_load(sm.k() + a * S::BLOCK_N * 128, tma_k, 64 * a, t.h_kv, k_row, sm.kv_full());
        tma_load(sm.v() + a * S::BLOCK_N * 128, tma_v, 64 * a, t.h_kv, k_row, sm.kv_full());
    }
    Step step(t, group, steps);
    for (int i = 0; i < steps.count; ++i, step.next(steps)) {
        if (i >= S::STAGES) mbarrier_wait(sm.stage_free(i), (i / S::STAGES - 1) & 1);
        const int q_row = t.queries.start + step.tile * S::BLOCK_M;
        mbarrier_expect_bytes(sm.stage_full(i), 2 * S::Q_BYTES);
        for (int a = 0; a < S::ATOMS; ++a) {
            tma_load(sm.q(i) + a * S::BLOCK_M * 128, tma_q, 64 * a, step.h, q_row, sm.stage_full(i));
            tma_load(sm.dout(i) + a * S::BLOCK_M * 128, tma_do, 64 * a, step.h, q_row, sm.stage_full(i));
        }
    }
}

// The producer's lse and delta of each step, from one warp.
template <int HEAD_DIM>
__device__ __forceinline__ void produce_rows(const AttnParams& p, const BwdParams& g, const KeyTile& t,
                                             const BwdSteps& steps, const BwdHopperShared<HEAD_DIM>& sm) {
    using S = BwdHopperShared<HEAD_DIM>;
    const int group = p.heads / p.heads_kv, lane = threadIdx.x % 32;
    Step step(t, group, steps);
    for (int i = 0; i < steps.count; ++i, step.next(steps)) {
        if (i >= S::STAGES) mbarrier_wait(sm.stage_free(i), (i / S::STAGES - 1) & 1);
        const long long at = step.h * p.total_q + t.queries.start;
        float* lse = (float*)__cvta_shared_to_generic(sm.rows(i));
        for (int c = lane; c < S::BLOCK_M; c += 32) {
            const int row = step.tile * S::BLOCK_M + c;
            const bool valid = row < t.queries.len;
            const float l = valid ? ((const float*)p.lse)[at + row] : neg_inf<float>();
            // A row past the end, or one that sees no key, gets P = 0.
            lse[c] = l == neg_inf<float>() ? -neg_inf<float>() : l * LOG2_E;
            lse[S::BLOCK_M + c] = valid ? g.delta[at + row] : 0.f;
        }
        mbarrier_arrive(sm.stage_full(i));
    }
}

// The deterministic mode's dQ additions, from one producer thread. Per step:
// wait for this key tile's turn at the step's query tile (its place among the
// key tiles whose steps reach that tile, in the order the grid launches
// them), have the copy engine add both warpgroups' staged blocks, release the
// staging once it has been read, and pass the turn on once the additions are
// complete (visible to this thread, then published by a release at gpu
// scope). One turn per step and head: at BLOCK_M 128 the step's two 64-row
// slots take the turn of the first, as the same key tiles add to both.
template <int HEAD_DIM>
__device__ __forceinline__ void add_dq_in_turn(const AttnParams& p, const BwdParams& g, const KeyTile& t,
                                               const BwdSteps& steps, const BwdHopperShared<HEAD_DIM>& sm,
                                               bool last_first) {
    using S = BwdHopperShared<HEAD_DIM>;
    const int group = p.heads / p.heads_kv, n = t.n0 / S::BLOCK_N;
    Step step(t, group, steps);
    for (int i = 0; i < steps.count; ++i, step.next(steps)) {
        const int m0 = step.tile * S::BLOCK_M;
        const KeyTiles adding = key_tiles_seeing<S::BLOCK_M, S::BLOCK_N>(p, t, step.tile);
        const int mine = last_first ? adding.last - n : n - adding.first;
        const long long slot = query_tile_slot(t.queries, t.b, m0 / 64);
        int* turn = g.dq_turns + step.h * g.tiles_per_head + slot;
        wait_for_turn(turn, mine);
        fence_proxy_async_global();  // the earlier key tiles' additions come before this one's
        for (int wg = 0; wg < 2; ++wg) {
            mbarrier_wait(sm.dq_full(wg), i & 1);
            if (S::dq_row0(wg) == 0 || m0 + S::dq_row0(wg) < t.queries.len)  // not a block wholly past the end
                bulk_reduce_add_f32(g.dq_accum + DqAccum<S::ATOMS>::block(g, step.h, slot + S::dq_row0(wg) / 64,
                                                                          S::dq_atom(wg)),
                                    sm.dq(wg), S::DQ_BYTES);
        }
        bulk_wait_read<0>();
        mbarrier_arrive(sm.dq_free(0));
        mbarrier_arrive(sm.dq_free(1));
        bulk_wait<0>();
        fence_proxy_async_global();
        store_release(turn, mine + 1);
    }
}

template <typename T, int HEAD_DIM, bool DETERMINISTIC>
__device__ __forceinline__ void consume(const AttnParams& p, const BwdParams& g, const KeyTile& t,
                                        const BwdSteps& steps, const BwdHopperShared<HEAD_DIM>& sm) {
    using S = BwdHopperShared<HEAD_DIM>;
    constexpr int BLOCK_M = S::BLOCK_M, M_BLOCKS = BLOCK_M / 8, M_STEPS = BLOCK_M / 16, D_BLOCKS = S::WIDTH / 8;
    constexpr bool ROWS_EARLY = BLOCK_M == 64;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
    const int key_row = 64 * wg + 16 * (warp % 4) + lane / 4;  // this thread's keys: key_row and + 8 of the tile
    const int group = p.heads / p.heads_kv;
    const float scale_log2 = (float)p.scale * LOG2_E, scale = (float)p.scale;
    const QueryRange seen_by[2] = {visible_queries(p, t, t.n0 + key_row), visible_queries(p, t, t.n0 + key_row + 8)};
    // Operands of S^T and dP^T for k-step kk: this warpgroup's keys, the tile's queries.
    const auto key_operand = [](int kk) { return (kk / 4) * S::BLOCK_N * 128 + (kk % 4) * 32; };
    const unsigned long long k_major_k = wgmma_descriptor(sm.k() + wg * 64 * 128, 16, 1024),
                             k_major_v = wgmma_descriptor(sm.v() + wg * 64 * 128, 16, 1024),
                             mn_major_k = wgmma_descriptor(sm.k() + S::dq_atom(wg) * S::BLOCK_N * 128,
                                                           S::BLOCK_N * 128, 1024);
    const auto query_operand = [](int kk) { return (kk / 4) * BLOCK_M * 128 + (kk % 4) * 32; };

    float dk[D_BLOCKS * 4], dv[D_BLOCKS * 4];
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) dk[e] = dv[e] = 0.f;

    if (steps.count > 0) {
        mbarrier_wait(sm.kv_full(), 0);
        if (t.n0 + S::BLOCK_N > t.keys.len) {
            zero_rows_from<S::BLOCK_N, S::ATOMS, S::CONSUMERS>(sm.k(), t.keys.len - t.n0);
            fence_proxy_async();
            named_barrier_sync(1, S::CONSUMERS);
        }
    }
    Step step(t, group, steps);
    for (int i = 0; i < steps.count; ++i, step.next(steps)) {
        const int h = step.h, m0 = step.tile * BLOCK_M;
        mbarrier_wait(sm.stage_full(i), (i / S::STAGES) & 1);
        if (m0 + BLOCK_M > t.queries.len) {
            zero_rows_from<BLOCK_M, S::ATOMS, S::CONSUMERS>(sm.q(i), t.queries.len - m0);
            zero_rows_from<BLOCK_M, S::ATOMS, S::CONSUMERS>(sm.dout(i), t.queries.len - m0);
            fence_proxy_async();
            named_barrier_sync(1, S::CONSUMERS);
        }
        // lse before the products where registers allow (ROWS_EARLY): once
        // they run, their operand reads keep shared memory busy and a load
        // waits long. At BLOCK_M 128, S^T and dP^T take those registers, and
        // each pair of lse and delta is loaded where it is used.
        const float* rows = (const float*)__cvta_shared_to_generic(sm.rows(i));  // lse, then delta
        const auto row_pair = [&](int at, int j) { return *(const float2*)(rows + at + 8 * j + 2 * (lane % 4)); };
        float2 early[ROWS_EARLY ? M_BLOCKS : 1];
        if constexpr (ROWS_EARLY) {
#pragma unroll
            for (int j = 0; j < M_BLOCKS; ++j) early[j] = row_pair(0, j);
        }

        // S^T = K Q^T, then dP^T = V dO^T, in two groups so that P^T is computed
        // while dP^T runs: this warpgroup's 64 keys x BLOCK_M queries, K-major
        // operands, 16 of head_dim per instruction, 4 per swizzle atom (only
        // head_dim's columns: the rest of the last atom is zeros).
        float s[M_BLOCKS * 4], dp[M_BLOCKS * 4];
        const unsigned long long k_major_q = wgmma_descriptor(sm.q(i), 16, 1024),
                                 k_major_dout = wgmma_descriptor(sm.dout(i), 16, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
            WgmmaSS<T, BLOCK_M>::run(s, descriptor_plus(k_major_k, key_operand(kk)),
                                     descriptor_plus(k_major_q, query_operand(kk)), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
            WgmmaSS<T, BLOCK_M>::run(dp, descriptor_plus(k_major_v, key_operand(kk)),
                                     descriptor_plus(k_major_dout, query_operand(kk)), kk > 0);
        wgmma_commit();

        // P^T while dP^T runs (K and Q rows past the ends are zeros: finite),
        // then dS^T; masked elements of both become 0 (element masks only where
        // the pair of tiles crosses a mask edge or a sequence's end; dP^T may
        // be NaN there: V rows past the end).
        wgmma_wait<1>();
        fence_registers(s);
#pragma unroll
        for (int j = 0; j < M_BLOCKS; ++j) {
            const float2 lse = ROWS_EARLY ? early[ROWS_EARLY ? j : 0] : row_pair(0, j);
#pragma unroll
            for (int e = 0; e < 4; ++e) s[4 * j + e] = fast_exp2(fmaf(s[4 * j + e], scale_log2, -(e % 2 ? lse.y : lse.x)));
        }
        if constexpr (ROWS_EARLY) {  // delta, loaded while dP^T runs, in lse's registers
#pragma unroll
            for (int j = 0; j < M_BLOCKS; ++j) early[j] = row_pair(BLOCK_M, j);
        }
        wgmma_wait<0>();
        fence_registers(dp);
#pragma unroll
        for (int j = 0; j < M_BLOCKS; ++j) {
            const float2 delta = ROWS_EARLY ? early[ROWS_EARLY ? j : 0] : row_pair(BLOCK_M, j);
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - (e % 2 ? delta.y : delta.x));
        }
        // Apart from the loop above, so that unmasked pairs of tiles (most)
        // take no branch per element.
        if (pair_crosses_edge<BLOCK_M, 64>(p, t, t.n0 + 64 * wg, m0)) {
#pragma unroll
            for (int j = 0; j < M_BLOCKS; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const bool visible = seen_by[e / 2].contains(m0 + 8 * j + 2 * (lane % 4) + e % 2);
                    dp[4 * j + e] = visible ? dp[4 * j + e] : 0.f;
                    s[4 * j + e] = visible ? s[4 * j + e] : 0.f;
                }
        }
        unsigned pt[M_STEPS][4], dst[M_STEPS][4];  // P^T and dS^T as A operands, 16 queries each
#pragma unroll
        for (int kk = 0; kk < M_STEPS; ++kk) {
            p_fragment<T, M_BLOCKS>(s, kk, pt[kk]);
            p_fragment<T, M_BLOCKS>(dp, kk, dst[kk]);
        }
        // dV += P^T dO (dO read MN-major: 16 query rows, two 8-row groups of
        // 1024 bytes, per instruction; N = whole atoms), running while dS^T is stored.
        const unsigned long long mn_major_q = wgmma_descriptor(sm.q(i), BLOCK_M * 128, 1024),
                                 mn_major_dout = wgmma_descriptor(sm.dout(i), BLOCK_M * 128, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < M_STEPS; ++kk)
            WgmmaRS<T, S::WIDTH>::run(dv, pt[kk], descriptor_plus(mn_major_dout, kk * 2048));
        wgmma_commit();

        // dS^T -> shared memory: rows = the tile's 128 keys, BLOCK_M queries in
        // atoms of 64 (128 bytes per row; 16-byte chunk c of row r at c ^ (r % 8)).
        unsigned char* ds = (unsigned char*)__cvta_shared_to_generic(sm.ds(i));
#pragma unroll
        for (int kk = 0; kk < M_STEPS; ++kk)
#pragma unroll
            for (int x = 0; x < 4; ++x) {  // A fragment register x: rows + 8 (x % 2), queries 16 kk + 8 (x / 2)
                const int row = key_row + 8 * (x % 2), chunk = 2 * kk + x / 2;
                *(unsigned*)(ds + (chunk / 8) * S::BLOCK_N * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16)
                             + (lane % 4) * 4) = dst[kk][x];
            }
        fence_proxy_async();
        if (!DETERMINISTIC && threadIdx.x % 128 == 0) bulk_wait_read<0>();  // the last dQ add has read the staging
        named_barrier_sync(2, S::CONSUMERS);  // both halves of dS^T are in place

        // This warpgroup's 64 x 64 block of dQ (queries dq_row0 + [0, 64),
        // head_dim's atom dq_atom) = dS K over all 128 keys: dS is the stored
        // dS^T read MN-major, K read MN-major. Then dK += dS^T Q, which runs
        // while dQ is staged.
        float dq[32];
        const unsigned long long mn_major_ds = wgmma_descriptor(sm.ds(i) + S::dq_row0(wg) / 64 * S::BLOCK_N * 128,
                                                                S::BLOCK_N * 128, 1024);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < S::BLOCK_N / 16; ++kk)
            WgmmaSS<T, 64, true>::run(dq, descriptor_plus(mn_major_ds, kk * 2048), descriptor_plus(mn_major_k, kk * 2048),
                                      kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < M_STEPS; ++kk)
            WgmmaRS<T, S::WIDTH>::run(dk, dst[kk], descriptor_plus(mn_major_q, kk * 2048));
        wgmma_commit();
        wgmma_wait<1>();  // dV and dQ are done
        fence_registers(pt);
        fence_registers(dv);
        fence_registers(dq);

        // This warpgroup's block of dQ, staged in DqAccum's block layout, then
        // added by the copy engine in one bulk reduction (the staging is free
        // again: its issuing thread waited for the last one before barrier 2;
        // deterministic: the writer has read it). A block wholly past the
        // queries' end (ATOMS 1) holds zeros and is not added.
        float* staged = (float*)__cvta_shared_to_generic(sm.dq(wg));
        if (DETERMINISTIC && i > 0) mbarrier_wait(sm.dq_free(wg), (i - 1) & 1);
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j)
                *(float2*)(staged + DqAccum<S::ATOMS>::offset(16 * (warp % 4) + lane / 4 + 8 * r, 8 * j + 2 * (lane % 4))) =
                    make_float2(dq[4 * j + 2 * r] * scale, dq[4 * j + 2 * r + 1] * scale);
        fence_proxy_async();
        if constexpr (DETERMINISTIC) {
            mbarrier_arrive(sm.dq_full(wg));  // the writer adds it in turn
        } else {
            named_barrier_sync(3 + wg, 128);
            const int dq_m0 = m0 + S::dq_row0(wg);
            const long long slot = query_tile_slot(t.queries, t.b, dq_m0 / 64);
            if (threadIdx.x % 128 == 0 && (S::dq_row0(wg) == 0 || dq_m0 < t.queries.len))
                bulk_reduce_add_f32(g.dq_accum + DqAccum<S::ATOMS>::block(g, h, slot, S::dq_atom(wg)), sm.dq(wg),
                                    S::DQ_BYTES);
        }
        wgmma_wait<0>();  // dK is done: Q and dO are free
        fence_registers(dst);
        fence_registers(dk);
        mbarrier_arrive(sm.stage_free(i));  // from every thread: each releases its own reads of lse and delta
    }
    if (!DETERMINISTIC && threadIdx.x % 128 == 0) bulk_wait_read<0>();  // shared memory must outlive the copy's reads

    // dK * scale and dV for this thread's keys (head_dim's columns), once.
    store_dk_dv<T, D_BLOCKS>(p, g, t.keys, t.h_kv, t.n0 + key_row, HEAD_DIM, 0, dk, dv, scale);
}

// Registers per thread after the split. The consumers' increase waits until
// the pool holds what they ask for, and the pool is what the CTA got at
// launch: 168 per thread (65536 / 384, rounded down to 8) = 64512 =
// 24 x 128 + 240 x 256.
constexpr int BWD_PRODUCER_REGISTERS = 24, BWD_CONSUMER_REGISTERS = 240;

template <typename T, int HEAD_DIM, bool DETERMINISTIC>
__global__ void __launch_bounds__(384, 1)
flash_bwd_hopper(const AttnParams p, const int* order, const int* tile_offsets, const BwdParams g,
                 const __grid_constant__ TensorMap tma_q, const __grid_constant__ TensorMap tma_k,
                 const __grid_constant__ TensorMap tma_v, const __grid_constant__ TensorMap tma_do) {
    using S = BwdHopperShared<HEAD_DIM>;
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) unsigned long long barriers[S::BARRIERS + (DETERMINISTIC ? S::DQ_BARRIERS : 0)];
    S sm;
    sm.base = smem_address(shared_raw) + (1024 - smem_address(shared_raw) % 1024) % 1024;  // swizzle atoms: 1024-aligned
    sm.barriers = smem_address(barriers);

    // Deterministic: the order of the key tiles adding to a query tile is the
    // order the grid launches a sequence's key tiles in, last to first where
    // the mask bounds keys from the right, else first to last (the header says why).
    long long right;
    const bool last_first = DETERMINISTIC && right_bound(p, right);
    KeyTile t;
    if (!locate_key_tile<S::BLOCK_N>(p, order, tile_offsets, t, last_first)) return;
    const QueryTiles m_tiles = query_tiles<S::BLOCK_M, S::BLOCK_N>(p, t.n0, t.queries.len, t.diagonal);
    const int per_head = m_tiles.end - m_tiles.first;
    const BwdSteps steps{m_tiles.first, per_head, per_head * (p.heads / p.heads_kv), DETERMINISTIC && !last_first};
    if (threadIdx.x == 0) sm.init(DETERMINISTIC);
    __syncthreads();
    if (threadIdx.x >= S::CONSUMERS) {
        set_max_registers_dec<BWD_PRODUCER_REGISTERS>();
        const int producer_warp = (threadIdx.x - S::CONSUMERS) / 32;
        if (producer_warp == 0 && threadIdx.x % 32 == 0 && steps.count > 0)
            produce_tiles(p, t, steps, sm, tma_q, tma_k, tma_v, tma_do);
        if (producer_warp == 1) produce_rows(p, g, t, steps, sm);
        if (DETERMINISTIC && producer_warp == 2 && threadIdx.x % 32 == 0)
            add_dq_in_turn(p, g, t, steps, sm, last_first);
    } else {
        set_max_registers_inc<BWD_CONSUMER_REGISTERS>();
        consume<T, HEAD_DIM, DETERMINISTIC>(p, g, t, steps, sm);
    }
}

// dQ from the accumulator, in the inputs' dtype: ROW_LANES lanes per query
// row (4 columns each, WIDTH / 4 columns per pass), 8 * 32 / ROW_LANES rows
// per CTA and pass over the rows (backends/flash.py: hopper_dq_rows), heads
// HEADS_AT_ONCE at a time (loads in flight); rows in no sequence, or past
// seqused, get 0.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(256) flash_bwd_hopper_dq(const AttnParams p, const BwdParams g, void* dq) {
    static_assert(sizeof(T) == 2, "bf16 or fp16");
    using S = BwdHopperShared<HEAD_DIM>;
    constexpr int HEADS_AT_ONCE = 4, ROW_LANES = S::WIDTH / 4 < 32 ? S::WIDTH / 4 : 32, ROWS = 256 / ROW_LANES;
    const int lane = threadIdx.x % ROW_LANES;
    for (long long row = (long long)blockIdx.x * ROWS + threadIdx.x / ROW_LANES; row < p.total_q;
         row += (long long)gridDim.x * ROWS) {
        const int b = sequence_of(p.cu_seqlens_q, p.batch, row);
        long long slot = -1;  // the row's query-tile slot, if it has one
        int r = 0;            // and its row there
        if (b >= 0) {
            const SeqSpan queries = query_span(p, b);
            if (row - queries.start < queries.len) {
                slot = query_tile_slot(queries, b, (int)((row - queries.start) / 64));
                r = (int)((row - queries.start) % 64);
            }
        }
        T* out = (T*)dq + row * p.heads * HEAD_DIM;
        for (int c = 4 * lane; c < HEAD_DIM; c += 4 * ROW_LANES) {
            const float* accum = g.dq_accum + DqAccum<S::ATOMS>::offset(r, c % 64);
            for (int h0 = 0; h0 < p.heads; h0 += HEADS_AT_ONCE) {
                float4 x[HEADS_AT_ONCE];
#pragma unroll
                for (int u = 0; u < HEADS_AT_ONCE; ++u)
                    x[u] = slot >= 0 && h0 + u < p.heads
                         ? *(const float4*)(accum + DqAccum<S::ATOMS>::block(g, h0 + u, slot, c / 64))
                         : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int u = 0; u < HEADS_AT_ONCE; ++u)
                    if (h0 + u < p.heads)
                        *(uint2*)(out + (h0 + u) * HEAD_DIM + c) = make_uint2(pack2<T>(x[u].x, x[u].y), pack2<T>(x[u].z, x[u].w));
            }
        }
    }
}
