// flash_fwd_hopper.cu — the flash forward on Hopper (sm_90a): the algorithm
// of flash_fwd.cu, with warpgroup matrix instructions (wgmma) in place of
// mma.sync and the copy engine (TMA) in place of cp.async, for head dims 64,
// 128 and 256.
//
// Per CTA = (query tile of 64 x WARPGROUPS rows, head, sequence): WARPGROUPS
// consumer warpgroups of 64 query rows each, and one producer warpgroup.
//   Producer: one thread issues the bulk copies: the Q tile once, then each K
//     and V tile (2 K and 3 V buffers) as soon as every consumer warp has
//     released the buffer it goes into; copies complete on mbarriers. Its
//     warpgroup keeps 24 registers and gives the rest to the consumers
//     (setmaxnreg), so they hold S, P and O without spilling.
//   Consumers, per key tile i: S(i) = Q K(i)^T with both operands read by
//     the tensor cores from 128-byte-swizzled shared memory (m64nBLOCK_Nk16),
//     issued together with O += P(i-1) V(i-1) (P from registers, V read
//     MN-major, m64nHEAD_DIMk16); the masks and online softmax of S(i)
//     (block_ranges.cuh, softmax.cuh) run on the CUDA cores while the tensor cores finish
//     P(i-1) V(i-1); each warp releases K(i) and V(i-1) once its wgmma reads
//     are done. No CTA-wide barrier in the loop. Two warpgroups take turns
//     at issuing their products (two named barriers), so that the tensor
//     cores run one's while the other computes its softmax; measured on the
//     H200 (forward alone, CUDA events) W1 1.20 -> 1.11 ms, W4 1.05 -> 0.92.
//   Then O / l and the LSE, once (epilogues.cuh: write_rows).
// Copies bring whole tiles, so rows past a sequence's end hold other data;
// the masks hide them from S, and the last V tile's are zeroed before P V.
// Tile plan, tile skipping under masks and the grid: tile_plan.cuh, block_ranges.cuh.
//
// Tiles (BLOCK_M = 64 x WARPGROUPS; shared memory = Q + 2 K + 3 V tiles + 1 KB
// for alignment; nvcc 13.0 -Xptxas -v, no spills; registers at entry, then
// per consumer thread after setmaxnreg):
//   head_dim  64:  1 consumer warpgroup,  BLOCK_N 64    S 32 + O 32 fp32/thread, 128 -> 232, 49 KB, 2 CTAs/SM
//   head_dim 128:  2 consumer warpgroups, BLOCK_N 128   S 64 + O 64,              168 -> 240, 193 KB
//   head_dim 256:  2 consumer warpgroups, BLOCK_N 64    S 32 + O 128,             168 -> 240, 225 KB
// (one consumer warpgroup at head_dim 256 does not build: ptxas wants 158
// registers at the m64n256 instruction, above the 128 of two CTAs per SM.)
// Measured (H100, bf16, DESIGN.md's workloads): cp.async by all threads with
// one CTA barrier per tile, W1 293-326 TFLOP/s; this producer/consumer split,
// 371 (backends/flash.py has the per-head-dim comparison).
#include "block_ranges.cuh"
#include "epilogues.cuh"
#include "softmax.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

// Where a CTA's tiles and barriers live in shared memory. Tile i of the key
// tiles a CTA visits (counted from 0) uses K buffer i % 2 and V buffer i % 3;
// its j-th use of a buffer (j = i / buffers) completes phase j of the
// buffer's "full" barrier (the copy landed) and of its "free" barrier (every
// consumer warp is done reading it).
template <int HEAD_DIM, int BLOCK_N, int WARPGROUPS>
struct HopperShared {
    static constexpr int BLOCK_M = 64 * WARPGROUPS, CONSUMERS = 128 * WARPGROUPS;
    static constexpr int ATOMS = HEAD_DIM / 64;  // 64-column swizzle atoms, one copy each
    static constexpr int Q_BYTES = BLOCK_M * HEAD_DIM * 2, KV_BYTES = BLOCK_N * HEAD_DIM * 2;
    static constexpr int K_BUFFERS = 2, V_BUFFERS = 3;
    unsigned q, barriers;  // shared-space addresses: Q tile (1024-aligned), then K and V buffers; barriers

    __device__ unsigned k(int i) const { return q + Q_BYTES + (i % K_BUFFERS) * KV_BYTES; }
    __device__ unsigned v(int i) const { return q + Q_BYTES + (K_BUFFERS + i % V_BUFFERS) * KV_BYTES; }
    __device__ unsigned q_full() const { return barriers; }
    __device__ unsigned k_full(int i) const { return barriers + 8 * (1 + i % K_BUFFERS); }
    __device__ unsigned k_free(int i) const { return barriers + 8 * (1 + K_BUFFERS + i % K_BUFFERS); }
    __device__ unsigned v_full(int i) const { return barriers + 8 * (1 + 2 * K_BUFFERS + i % V_BUFFERS); }
    __device__ unsigned v_free(int i) const { return barriers + 8 * (1 + 2 * K_BUFFERS + V_BUFFERS + i % V_BUFFERS); }
    static constexpr int BARRIERS = 1 + 2 * K_BUFFERS + 2 * V_BUFFERS;

    __device__ void init() const {
        mbarrier_init(q_full(), 1);
        for (int i = 0; i < K_BUFFERS; ++i) mbarrier_init(k_full(i), 1), mbarrier_init(k_free(i), CONSUMERS / 32);
        for (int i = 0; i < V_BUFFERS; ++i) mbarrier_init(v_full(i), 1), mbarrier_init(v_free(i), CONSUMERS / 32);
        mbarrier_init_fence();
    }
};

// The producer: one thread copies Q, then each K and V tile as soon as the
// consumers have freed its buffer.
template <int HEAD_DIM, int BLOCK_N, int WARPGROUPS>
__device__ __forceinline__ void produce(const FlashTile& t, const HopperShared<HEAD_DIM, BLOCK_N, WARPGROUPS>& sm,
                                        const TensorMap& tma_q, const TensorMap& tma_k, const TensorMap& tma_v) {
    using S = HopperShared<HEAD_DIM, BLOCK_N, WARPGROUPS>;
    const int tiles = t.end_tile - t.first_tile;
    const int q_row = t.queries.start + t.m0, k_row = t.keys.start + t.first_tile * BLOCK_N;
    mbarrier_expect_bytes(sm.q_full(), S::Q_BYTES);
    for (int a = 0; a < S::ATOMS; ++a) tma_load(sm.q + a * S::BLOCK_M * 128, tma_q, 64 * a, t.h, q_row, sm.q_full());
    for (int i = 0; i < tiles; ++i) {
        if (i >= S::K_BUFFERS) mbarrier_wait(sm.k_free(i), (i / S::K_BUFFERS - 1) & 1);
        mbarrier_expect_bytes(sm.k_full(i), S::KV_BYTES);
        for (int a = 0; a < S::ATOMS; ++a)
            tma_load(sm.k(i) + a * BLOCK_N * 128, tma_k, 64 * a, t.h_kv, k_row + i * BLOCK_N, sm.k_full(i));
        if (i >= S::V_BUFFERS) mbarrier_wait(sm.v_free(i), (i / S::V_BUFFERS - 1) & 1);
        mbarrier_expect_bytes(sm.v_full(i), S::KV_BYTES);
        for (int a = 0; a < S::ATOMS; ++a)
            tma_load(sm.v(i) + a * BLOCK_N * 128, tma_v, 64 * a, t.h_kv, k_row + i * BLOCK_N, sm.v_full(i));
    }
}

// A consumer warpgroup: its 64 query rows against every key tile, then the output.
template <typename T, int HEAD_DIM, int BLOCK_N, int WARPGROUPS>
__device__ __forceinline__ void consume(const AttnParams& p, const FlashTile& t,
                                        const HopperShared<HEAD_DIM, BLOCK_N, WARPGROUPS>& sm) {
    using S = HopperShared<HEAD_DIM, BLOCK_N, WARPGROUPS>;
    constexpr int N_BLOCKS = BLOCK_N / 8, D_BLOCKS = HEAD_DIM / 8;
    const int tiles = t.end_tile - t.first_tile;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = warp / 4;
    const int first_row = t.m0 + 64 * group + 16 * (warp % 4) + lane / 4;
    const float scale_log2 = (float)p.scale * LOG2_E;
    const unsigned q_address = sm.q + group * 64 * 128;  // this warpgroup's 64 rows

    float o[D_BLOCKS * 4];
    float row_max[2] = {neg_inf<float>(), neg_inf<float>()}, row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) o[e] = 0.f;
    float s[N_BLOCKS * 4];
    unsigned pv[BLOCK_N / 16][4];  // P of the previous tile, the A operand of its P V

    // S = Q K^T: K-major operands, 16 of head_dim per instruction, 4 per swizzle atom.
    auto issue_s = [&](int i) {
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const unsigned step = (kk % 4) * 32;  // bytes into the swizzle atom
            WgmmaSS<T, BLOCK_N>::run(s, wgmma_descriptor(q_address + (kk / 4) * S::BLOCK_M * 128 + step, 16, 1024),
                                     wgmma_descriptor(sm.k(i) + (kk / 4) * BLOCK_N * 128 + step, 16, 1024), kk > 0);
        }
        wgmma_commit();
    };
    // O += P V: V MN-major, 16 keys (two 8-row groups of 1024 bytes) per
    // instruction; its head_dim atoms lie BLOCK_N * 128 bytes apart.
    auto issue_pv = [&](int i) {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            WgmmaRS<T, HEAD_DIM>::run(o, pv[kk], wgmma_descriptor(sm.v(i) + kk * 2048, BLOCK_N * 128, 1024));
        wgmma_commit();
    };
    auto softmax = [&](int i, float (&rescale)[2]) {
        const int n0 = (t.first_tile + i) * BLOCK_N;
        if (crosses_edge<BLOCK_N>(p, t, n0)) mask_scores<N_BLOCKS>(p, t, first_row, n0, s);
        softmax_scores<N_BLOCKS>(s, row_max, row_sum, scale_log2, rescale);
    };
    auto keep_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) p_fragment<T, N_BLOCKS>(s, kk, pv[kk]);
    };
    auto release = [&](unsigned barrier) {  // this warp is done reading a buffer
        if (lane == 0) mbarrier_arrive(barrier);
    };
    // Two warpgroups take turns at issuing their products (barriers 2 and 3:
    // "warpgroup w may issue"), so that one's softmax runs while the other's
    // products keep the tensor cores busy; the first warpgroup starts. Each
    // hands the turn on after issuing, except the second one at its last turn.
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
        mbarrier_wait(sm.q_full(), 0);
        mbarrier_wait(sm.k_full(0), 0);
        take_turn();
        wgmma_fence();
        issue_s(0);
        pass_turn();
        wgmma_wait<0>();
        fence_registers(s);
        release(sm.k_free(0));
        float rescale[2];
        softmax(0, rescale);
        keep_p();
    }
    for (int i = 1; i < tiles; ++i) {
        mbarrier_wait(sm.k_full(i), (i / S::K_BUFFERS) & 1);
        mbarrier_wait(sm.v_full(i - 1), ((i - 1) / S::V_BUFFERS) & 1);
        take_turn();
        wgmma_fence();
        issue_s(i);
        issue_pv(i - 1);
        pass_turn();
        wgmma_wait<1>();  // S(i) done; P(i - 1) V(i - 1) may still run
        fence_registers(s);
        release(sm.k_free(i));
        float rescale[2];
        softmax(i, rescale);
        wgmma_wait<0>();
        fence_registers(o);
        fence_registers(pv);
        release(sm.v_free(i - 1));
        rescale_rows<D_BLOCKS>(o, rescale);
        keep_p();
    }
    if (tiles > 0) {
        const int last = tiles - 1;
        mbarrier_wait(sm.v_full(last), (last / S::V_BUFFERS) & 1);
        // Copies bring whole tiles: rows past the sequence's keys hold another
        // sequence or unused memory, and P = 0 there would not cancel a NaN.
        // Only the last tile can have such rows; they become zeros first.
        const int valid = t.keys.len - (t.first_tile + last) * BLOCK_N;
        if (valid < BLOCK_N) {
            zero_rows_from<BLOCK_N, S::ATOMS, S::CONSUMERS>(sm.v(last), valid);
            fence_proxy_async();
            named_barrier_sync(1, S::CONSUMERS);
        }
        take_turn();
        wgmma_fence();
        issue_pv(last);
        pass_turn();
        wgmma_wait<0>();
        fence_registers(o);
    }
    write_rows<T, D_BLOCKS>(p, t, first_row, o, row_max, row_sum, (float)p.scale);
}

// Registers per thread after the split (multiples of 8): the producer keeps
// few; the consumers take the rest of the register file.
constexpr int PRODUCER_REGISTERS = 24;

template <typename T, int HEAD_DIM, int BLOCK_N, int WARPGROUPS>
__global__ void __launch_bounds__(128 * (WARPGROUPS + 1), 2 / WARPGROUPS)
flash_fwd_hopper(const AttnParams p, const int* order, const int* tile_offsets, const __grid_constant__ TensorMap tma_q,
                 const __grid_constant__ TensorMap tma_k, const __grid_constant__ TensorMap tma_v) {
    using S = HopperShared<HEAD_DIM, BLOCK_N, WARPGROUPS>;
    // 65536 registers per SM over 2 / WARPGROUPS CTAs of WARPGROUPS + 1 warpgroups
    constexpr int CONSUMER_REGISTERS =
        ((65536 / (2 / WARPGROUPS) / 128 - PRODUCER_REGISTERS) / WARPGROUPS) / 8 * 8 > 240
            ? 240 : ((65536 / (2 / WARPGROUPS) / 128 - PRODUCER_REGISTERS) / WARPGROUPS) / 8 * 8;
    extern __shared__ unsigned char shared_raw[];
    __shared__ __align__(8) unsigned long long barriers[S::BARRIERS];
    S sm;
    sm.q = smem_address(shared_raw) + (1024 - smem_address(shared_raw) % 1024) % 1024;  // swizzle atoms: 1024-aligned
    sm.barriers = smem_address(barriers);

    FlashTile t;
    if (!locate_tile<S::BLOCK_M, BLOCK_N>(p, order, tile_offsets, t)) return;
    if (threadIdx.x == 0) sm.init();
    __syncthreads();
    if (threadIdx.x >= S::CONSUMERS) {
        set_max_registers_dec<PRODUCER_REGISTERS>();
        if (threadIdx.x == S::CONSUMERS && t.end_tile > t.first_tile) produce(t, sm, tma_q, tma_k, tma_v);
    } else {
        set_max_registers_inc<CONSUMER_REGISTERS>();
        consume<T>(p, t, sm);
    }
}
