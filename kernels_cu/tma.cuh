// tma.cuh — Hopper's bulk tensor copies (TMA) and the shared-memory barriers
// (mbarriers) loads complete on, as the flash kernels on sm_90a use them.
//
// A copy is described by a tensor map that the host encodes once per tensor
// (varattn/cuda/tensor_map.py: cuTensorMapEncodeTiled) and passes by value as a
// __grid_constant__ kernel parameter. One thread issues a whole tile; the
// copy engine writes it, 128-byte swizzled, and counts its bytes against a
// barrier's expected transaction count; consumers wait on the barrier's phase.
#pragma once

// CUtensorMap: 128 opaque bytes, 64-byte aligned.
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ void mbarrier_init(unsigned barrier, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(arrivals) : "memory");
}

// Makes initialised barriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void mbarrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` from copies before the phase completes.
__device__ __forceinline__ void mbarrier_expect_bytes(unsigned barrier, unsigned bytes) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n"
                 :: "r"(barrier), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(unsigned barrier) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" :: "r"(barrier) : "memory");
}

// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(unsigned barrier, unsigned parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" :: "r"(barrier), "r"(parity) : "memory");
}

// The box at coordinates (column, head, row) of a 3-D (head_dim, heads, rows)
// tensor map into shared memory; rows past the tensor's end arrive as zeros.
__device__ __forceinline__ void tma_load(unsigned destination, const TensorMap& map, int column, int head, int row,
                                         unsigned barrier) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(destination), "l"((unsigned long long)&map), "r"(column), "r"(head), "r"(row), "r"(barrier)
                 : "memory");
}

// The box at (column, head, row) of a 3-D tensor map written from shared
// memory, laid out as tma_load brings it; elements past the tensor's bounds
// are not written (the map clips at its global sizes only). One thread
// issues it; bulk_commit() closes the thread's group of such stores.
__device__ __forceinline__ void tma_store(const TensorMap& map, unsigned source, int column, int head, int row) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n"
                 :: "l"((unsigned long long)&map), "r"(column), "r"(head), "r"(row), "r"(source) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Barrier `id` (1..15; 0 is __syncthreads) among `threads` threads: sync
// waits for all of them, arrive counts this thread's warp in and goes on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Hand registers back to / take them from the SM's pool, per warpgroup
// (every thread of the warpgroup executes it); needs a register cap at entry.
template <int REGISTERS>
__device__ __forceinline__ void set_max_registers_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGISTERS)); }
template <int REGISTERS>
__device__ __forceinline__ void set_max_registers_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGISTERS)); }

// Shared memory written through the generic proxy (stores, cp.async) before
// the async proxy reads it: the tensor cores (wgmma) or the copy engine.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Bulk reductions (sm_90): `bytes` (a multiple of 16, both addresses 16-byte
// aligned) of float32 in shared memory added to global memory by the copy
// engine, in one instruction from one thread. Shared memory written by
// ordinary stores must be fenced for the async proxy first; it may be
// reused once bulk_wait_read<0>() returns in the issuing thread.
__device__ __forceinline__ void bulk_reduce_add_f32(float* global, unsigned shared, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 :: "l"(global), "r"(shared), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Wait in the issuing thread until at most PENDING of its bulk groups are
// still reading their shared memory (then it may be overwritten), or, for
// bulk_wait, still writing global memory.
template <int PENDING>
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" :: "n"(PENDING) : "memory"); }
// Once bulk_wait<0>() returns, the issuing thread's reductions are
// complete: their writes are visible to it (then a release publishes them).
template <int PENDING>
__device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

// Global memory between the generic proxy (loads, stores, atomics) and the
// async proxy (the copy engine's bulk reductions), both ways.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }
