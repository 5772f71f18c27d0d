// flash_fwd_hopper.cu — the flash forward on Hopper (sm_90a): the algorithm
// of flash_fwd.cu, with warpgroup matrix instructions (wgmma) in place of
// mma.sync, for head dims 64, 128 and 256.
//
// Per CTA = (query tile of 64 x WARPGROUPS rows, head, sequence), each
// warpgroup on 64 query rows:
//   1. Q tile -> shared memory, resident; K and V tiles stream through two
//      and three buffers.
//   2. Per key tile n: S(n) = Q K(n)^T with both operands read by the tensor
//      cores from 128-byte-swizzled shared memory (wgmma.mma_async,
//      m64nBLOCK_Nk16), issued together with O += P(n-1) V(n-1) (P from
//      registers, V read MN-major, m64nHEAD_DIMk16); the masks and online
//      softmax of S(n) (flash_common.cuh) then run on the CUDA cores while the
//      tensor cores finish P(n-1) V(n-1); O is rescaled once that is done.
//      K(n+1) and V(n+1) load (cp.async) from the start of iteration n, into
//      two K and three V buffers, so one barrier per tile suffices.
//   3. O / l and the LSE, once (flash_common.cuh: write_rows).
// Tile plan, tile skipping under masks and the grid: flash_common.cuh.
//
// Tiles (BLOCK_M = 64 x WARPGROUPS; shared memory = Q + 2 K + 3 V tiles + 1 KB
// for alignment; registers from nvcc 13.0 -Xptxas -v, no spills):
//   head_dim  64:  1 warpgroup,  BLOCK_N 64    S 32 + O 32 fp32 per thread, 117 registers,  49 KB
//   head_dim 128:  2 warpgroups, BLOCK_N 128   S 64 + O 64,                 198 registers, 193 KB
//   head_dim 128:  1 warpgroup,  BLOCK_N 64    S 32 + O 64 (causal/window), 152 registers,  97 KB
//   head_dim 256:  2 warpgroups, BLOCK_N 64    S 32 + O 128,                215 registers, 225 KB
// Two warpgroups share each K/V tile, halving its shared-memory and L2
// traffic per query row; one warpgroup wastes less on a mask's diagonal and
// lets two CTAs share an SM, each hiding the other's barrier and softmax.
// Measured (H100, bf16, DESIGN.md's workloads): double-buffered K/V with two
// barriers a tile, W1 269 TFLOP/s; the software pipeline above with one
// barrier a tile, 311-326; at head_dim 128 causal (W2) one warpgroup 245
// against 223, at head_dim 64 causal (W3) 239 against 175, so the backend
// picks per head dim and mask (varattn/backends/flash.py).
#include "flash_common.cuh"
#include "wgmma.cuh"

template <int ROWS>
struct Swizzled128 {
    static __device__ __forceinline__ int offset(int row, int chunk) { return swizzled_offset(row, chunk, ROWS); }
};

template <typename T, int HEAD_DIM, int BLOCK_N, int WARPGROUPS>
__global__ void __launch_bounds__(128 * WARPGROUPS, 2 / WARPGROUPS)
flash_fwd_hopper(const AttnParams p, const int* order, const int* tile_offsets) {
    constexpr int HOPPER_THREADS = 128 * WARPGROUPS;
    constexpr int BLOCK_M = 64 * WARPGROUPS;
    constexpr int N_BLOCKS = BLOCK_N / 8;
    constexpr int D_BLOCKS = HEAD_DIM / 8;
    constexpr int Q_BYTES = BLOCK_M * HEAD_DIM * 2, KV_BYTES = BLOCK_N * HEAD_DIM * 2;

    // Swizzle atoms must start on 1024-byte boundaries.
    extern __shared__ unsigned char shared_raw[];
    unsigned char* q_tile = shared_raw + ((1024 - smem_address(shared_raw) % 1024) % 1024);
    auto k_tile = [&](int n_tile) { return q_tile + Q_BYTES + (n_tile % 2) * KV_BYTES; };
    auto v_tile = [&](int n_tile) { return q_tile + Q_BYTES + (2 + n_tile % 3) * KV_BYTES; };

    FlashTile t;
    if (!locate_tile<BLOCK_M, BLOCK_N>(p, order, tile_offsets, t)) return;
    const T* q = (const T*)p.q + t.queries.start * p.q_row_stride + t.h * p.q_head_stride;
    const T* k = (const T*)p.k + t.keys.start * p.k_row_stride + t.h_kv * p.k_head_stride;
    const T* v = (const T*)p.v + t.keys.start * p.v_row_stride + t.h_kv * p.v_head_stride;
    using KVLayout = Swizzled128<BLOCK_N>;
    auto load_k = [&](int n_tile) {
        load_tile<T, BLOCK_N, HEAD_DIM, HOPPER_THREADS, KVLayout>(k_tile(n_tile), k, p.k_row_stride,
                                                                  n_tile * BLOCK_N, t.keys.len);
    };
    auto load_v = [&](int n_tile) {
        load_tile<T, BLOCK_N, HEAD_DIM, HOPPER_THREADS, KVLayout>(v_tile(n_tile), v, p.v_row_stride,
                                                                  n_tile * BLOCK_N, t.keys.len);
    };

    const int group = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    const int first_row = t.m0 + 64 * group + 16 * warp + lane / 4;
    const float scale_log2 = (float)p.scale * LOG2_E;
    const unsigned q_address = smem_address(q_tile) + group * 64 * 128;  // this warpgroup's 64 rows

    float o[D_BLOCKS * 4];
    float row_max[2] = {neg_inf<float>(), neg_inf<float>()}, row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int e = 0; e < D_BLOCKS * 4; ++e) o[e] = 0.f;
    float s[N_BLOCKS * 4];
    unsigned pv[BLOCK_N / 16][4];  // P of the previous tile, the A operand of its P V

    // S(n) = Q K(n)^T: K-major operands, 16 of head_dim per instruction, 4 per swizzle atom.
    auto issue_s = [&](int n_tile) {
        const unsigned k_address = smem_address(k_tile(n_tile));
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            const unsigned step = (kk % 4) * 32;  // bytes into the swizzle atom
            WgmmaSS<T, BLOCK_N>::run(s, wgmma_descriptor(q_address + (kk / 4) * BLOCK_M * 128 + step, 16, 1024),
                                     wgmma_descriptor(k_address + (kk / 4) * BLOCK_N * 128 + step, 16, 1024), kk > 0);
        }
        wgmma_commit();
    };
    // O += P(n) V(n): V MN-major, 16 keys (two 8-row groups of 1024 bytes) per
    // instruction; its head_dim atoms lie BLOCK_N * 128 bytes apart.
    auto issue_pv = [&](int n_tile) {
        const unsigned v_address = smem_address(v_tile(n_tile));
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk)
            WgmmaRS<T, HEAD_DIM>::run(o, pv[kk], wgmma_descriptor(v_address + kk * 2048, BLOCK_N * 128, 1024));
        wgmma_commit();
    };
    auto softmax = [&](int n_tile, float (&rescale)[2]) {
        if (crosses_edge<BLOCK_N>(p, t, n_tile * BLOCK_N)) mask_scores<N_BLOCKS>(p, t, first_row, n_tile * BLOCK_N, s);
        softmax_scores<N_BLOCKS>(s, row_max, row_sum, scale_log2, rescale);
    };
    auto keep_p = [&]() {
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) p_fragment<T, N_BLOCKS>(s, kk, pv[kk]);
    };

    // Software pipeline: while the softmax of tile n runs on the CUDA cores,
    // the tensor cores compute P(n - 1) V(n - 1). One barrier per tile: past
    // it, S(n - 1) and P(n - 2) V(n - 2) are done everywhere, so K(n + 1) and
    // V(n + 1) (two K buffers, three V buffers) load right away and have a
    // whole tile's time to arrive.
    auto load_kv = [&](int n_tile) {
        if (n_tile < t.end_tile) {
            load_k(n_tile);
            load_v(n_tile);
        }
        cp_async_commit();  // possibly empty, so that every tile is one group
    };
    if (t.first_tile < t.end_tile) {
        load_tile<T, BLOCK_M, HEAD_DIM, HOPPER_THREADS, Swizzled128<BLOCK_M>>(q_tile, q, p.q_row_stride, t.m0,
                                                                             t.queries.len);
        load_kv(t.first_tile);
        load_kv(t.first_tile + 1);
        cp_async_wait<1>();
        fence_proxy_async();
        __syncthreads();
        wgmma_fence();
        issue_s(t.first_tile);
        wgmma_wait<0>();
        fence_registers(s);
        float rescale[2];
        softmax(t.first_tile, rescale);
        keep_p();
    }
    for (int n_tile = t.first_tile + 1; n_tile < t.end_tile; ++n_tile) {
        cp_async_wait<0>();  // K(n), V(n): this thread's copies
        fence_proxy_async();
        __syncthreads();     // ... and everyone's; S(n - 1) and P(n - 2) V(n - 2) are done
        load_kv(n_tile + 1);
        wgmma_fence();
        issue_s(n_tile);
        issue_pv(n_tile - 1);
        wgmma_wait<1>();  // S(n) done; P(n - 1) V(n - 1) may still run
        fence_registers(s);
        float rescale[2];
        softmax(n_tile, rescale);
        wgmma_wait<0>();
        fence_registers(o);
        rescale_rows<D_BLOCKS>(o, rescale);
        keep_p();
    }
    if (t.first_tile < t.end_tile) {
        wgmma_fence();
        issue_pv(t.end_tile - 1);
        wgmma_wait<0>();
        fence_registers(o);
    }

    write_rows<T, D_BLOCKS>(p, t, first_row, o, row_max, row_sum);
}
